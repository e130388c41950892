"""The teacher served on its own ranks (`tropd-ds serve-teacher`), under the real launchers: a trainer on 2 ranks
with `teacher.url` gives the per-step metrics of the same run with the teacher inside the job (service on 1 and
on 2 ranks; rollout micro-batches scored while the next ones decode); the service killed (SIGKILL) mid-run and
restarted, the run goes on; a service that stays away past teacher.wait_minutes stops the run with a checkpoint
of its last completed step, and the resume against a new service reproduces the uninterrupted run; every bad
request class over HTTP, with the service still answering afterwards. `make test-served` (CI runs it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from launch import ROOT, free_port, launch, launcher, records, release_shm, write_config

pytestmark = pytest.mark.served

# rollout micro-batches of 2 rows (4 rows per rank): the first is scored while the second decodes
OVERLAP = {"micro_batch_size": 2}
NOT_COMPARED = ("tokens_per_s", "step")  # and every time_*: the rest of each record must agree


class Service:
    """`tropd-ds serve-teacher` on the test workspace's teacher, in a process group of its own."""

    def __init__(self, workspace: Path, name: str, ranks: int = 1, port: int = 0, teacher: Path | None = None, **serve):
        folder = workspace / name
        folder.mkdir(exist_ok=True)
        self.address = folder / f"address-{time.monotonic_ns()}"
        config = {
            "teacher": {
                "path": str(teacher or workspace / "teacher"),
                "ds_config": str(ROOT / "ds_configs/cpu_teacher_zero3_offload.json"),
                "micro_batch_size": 4,
            },
            "serve": {"port": port, "address_file": str(self.address), **serve},
        }
        path = folder / "service.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        env.pop("TRITON_INTERPRET", None)
        self.master = free_port()
        if ranks == 1:
            cmd = [sys.executable, "-m", "tropd_ds.cli", "serve-teacher", "--config", str(path)]
        else:
            cmd = [*launcher(self.master, nproc=ranks), "--module", "tropd_ds.teacher_service", "--config", str(path)]
        self.log = folder / "service.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not self.address.is_file():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the service did not start: " + self.log.read_text()[-3000:]
            time.sleep(0.2)
        self.url = self.address.read_text().strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=60)
        release_shm(self.master)


@pytest.fixture(scope="module")
def local_reference(full_run):
    """The run with the teacher inside the job (conftest's full run, 6 steps)."""
    return records(full_run[0])


@pytest.fixture(scope="module")
def overlap_reference(workspace):
    """The run with the teacher inside the job and rollout micro-batches of 2 rows, 6 steps."""
    launch(write_config(workspace, "served_reference", rollout=OVERLAP))
    return records(workspace / "served_reference")


def served_overrides(url: str, **extra) -> list[str]:
    return ["teacher.path=", "teacher.ds_config=", f"teacher.url={url}", *(f"{k}={v}" for k, v in extra.items())]


def assert_same_run(found: list[dict], expected: list[dict], rtol: float = 1e-6) -> None:
    """Every number of every step's record (loss, trust fraction, log-ratio quantiles, lr, gradient norm, lengths,
    held-out accuracy...) within `rtol`; timings aside."""
    assert [r["step"] for r in found] == [r["step"] for r in expected]
    compared = 0
    for a, b in zip(found, expected):
        for key, value in b.items():
            if (
                key in NOT_COMPARED
                or key.startswith("time_")
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            assert a[key] == pytest.approx(value, rel=rtol, abs=1e-9), (a["step"], key, a[key], value)
            compared += 1
    assert compared > 20 * len(expected) - 20


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_served_teacher_gives_the_metrics_of_the_teacher_in_the_job(workspace, local_reference, ranks):
    service = Service(workspace, f"service{ranks}", ranks=ranks)
    try:
        name = f"served{ranks}"
        proc = launch(write_config(workspace, name), *served_overrides(service.url))
    finally:
        service.kill(signal.SIGTERM)
    found = records(workspace / name)
    assert_same_run(found, local_reference)
    timed = [r for r in found if "time_teacher_s" in r]
    assert len(timed) == 6 and all(0 <= r["time_teacher_wait_s"] <= r["time_teacher_s"] + 1e-6 for r in timed)
    assert f"teacher served at {service.url}" in proc.stdout and "= the student's)" in proc.stdout
    assert f"serving {workspace / 'teacher'} (18 tokens, float32, {ranks} ranks)" in service.log.read_text()


def test_rollout_micro_batches_are_scored_while_the_next_decode(workspace, overlap_reference):
    """With rollout.micro_batch_size 2, each micro-batch goes to the service as soon as it is decoded. The
    service scores those 2 rows apart, where the job's teacher scores the rank's 4 at once: the same model in
    other batch shapes, which rounds differently (the plain transformers teacher, 2 + 2 rows against 4, differs
    by up to 7e-7 in a log-prob on this CPU, in 27 of 30 random layouts), and over the steps the records drift
    apart by up to 2e-6 relative. So: 1e-4 here, and exactly equal where the batches are the same (above)."""
    service = Service(workspace, "overlap")
    try:
        proc = launch(write_config(workspace, "served_overlap", rollout=OVERLAP), *served_overrides(service.url))
    finally:
        service.kill(signal.SIGTERM)
    assert_same_run(records(workspace / "served_overlap"), overlap_reference, rtol=1e-4)
    assert proc.returncode == 0


def start_training(config: Path, *overrides: str, env_extra: dict) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("TRITON_INTERPRET", None)
    port = free_port()
    args = ["--module", "tropd_ds.train", "--config", str(config)]
    for o in overrides:
        args += ["--set", o]
    cmd = [*launcher(port), *args]
    proc = subprocess.Popen(
        cmd, env=env, cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc, port


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "logs/metrics.jsonl"
    while not (metrics.is_file() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines())):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_service_killed_and_restarted_mid_run_and_the_run_goes_on(workspace, local_reference):
    port = free_port()
    service = Service(workspace, "restarted", port=port)
    config = write_config(workspace, "served_restart")
    # rank 0 holds before step 4 for 3 s: the service is killed while step 3's record is the last
    proc, master = start_training(
        config, *served_overrides(service.url), env_extra={"TROPD_DS_FAULT": "stall@4:r0", "TROPD_DS_STALL_S": "3"}
    )
    try:
        wait_for_step(workspace / "served_restart", 3, proc)
        service.kill()
        time.sleep(4)  # step 4 asks a service that is not there: the client retries
        service = Service(workspace, "restarted", port=port)
        out, _ = proc.communicate(timeout=600)
    finally:
        service.kill(signal.SIGTERM)
        if proc.poll() is None:
            proc.kill()
        release_shm(master)
    assert proc.returncode == 0, out[-4000:]
    assert f"the teacher service at {service.url} does not answer (" in out
    assert f"the teacher service at {service.url} answers again" in out
    assert_same_run(records(workspace / "served_restart"), local_reference)


def test_a_service_gone_past_wait_minutes_stops_with_a_checkpoint_and_the_resume_is_exact(workspace, local_reference):
    service = Service(workspace, "gone")
    config = write_config(workspace, "served_gone", checkpoint={"every": 0})
    overrides = served_overrides(service.url, **{"teacher.wait_minutes": 0.1})
    proc, master = start_training(
        config, *overrides, env_extra={"TROPD_DS_FAULT": "stall@5:r0", "TROPD_DS_STALL_S": "3"}
    )
    try:
        wait_for_step(workspace / "served_gone", 4, proc)
        service.kill()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        release_shm(master)
    assert proc.returncode == 6, out[-4000:]
    assert f"error: the teacher service at {service.url} did not answer for 6 s (teacher.wait_minutes=0.1): " in out, (
        out[-3000:]
    )
    ckpt = workspace / "served_gone/ckpt"
    assert f"stopped before step 5 (checkpoint of step 4 saved in {ckpt})" in out
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step4"]
    # a new service (another port): teacher.url may change on resume; the run ends as if never stopped
    service = Service(workspace, "gone_again")
    try:
        again = launch(config, *served_overrides(service.url))
    finally:
        service.kill(signal.SIGTERM)
    assert "resumed from" in again.stdout and "at step 4" in again.stdout
    assert_same_run(records(workspace / "served_gone"), local_reference)


def test_a_trainer_refuses_a_service_with_another_tokenizer(workspace, tmp_path):
    """The service's tokenizer differs from the student's by one token: refused before step 1, naming both."""
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other_teacher"
    shutil.copytree(workspace / "teacher", other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<other>"])
    tok.save_pretrained(other)
    service = Service(tmp_path, "other", teacher=other)
    try:
        proc, master = start_training(
            write_config(workspace, "served_other_tokenizer"), *served_overrides(service.url), env_extra={}
        )
        out, _ = proc.communicate(timeout=600)
        release_shm(master)
    finally:
        service.kill(signal.SIGTERM)
    assert proc.returncode == 2, out[-3000:]
    assert f"the teacher served at {service.url} ({other}, 19 tokens, tokenizer " in out
    assert f"and the student ({workspace / 'student'}, 18 tokens, tokenizer " in out
    assert "have different tokenizers: token-level distillation needs one vocabulary" in out


# ----------------------------------------------------------------------------- requests over HTTP


SECRET = "correct horse battery staple"


@pytest.fixture(scope="module")
def guarded(workspace):
    """A service that requires a shared secret, with small limits (8 rows, 0.05 MB)."""
    (workspace / "secret").write_text(SECRET + "\n")
    service = Service(workspace, "guarded", token_file=str(workspace / "secret"), max_rows=8, max_request_mb=0.05)
    yield service
    service.kill(signal.SIGTERM)


def post(service: Service, path: str, body: bytes, token: str | None = SECRET) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{service.url}/v1/{path}", data=body, method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def good_request(workspace) -> tuple[bytes, torch.Tensor, torch.Tensor, torch.Tensor]:
    from tropd_ds.teacher_wire import encode_request

    ids = torch.tensor([[2, 5, 7, 3, 9, 11, 4], [0, 0, 6, 8, 10, 12, 13]])
    mask = (ids != 0).long()
    targets = mask[:, 1:].bool() & mask[:, :-1].bool()
    return encode_request(ids, mask, targets, 5, 0.8), ids, mask, targets


def test_the_service_answers_the_oracles_top_k_and_states_what_it_serves(workspace, guarded):
    """The answer against the naive oracle on the plain model (no DeepSpeed); /v1/info over HTTP."""
    import tropd_kernels as tk
    from transformers import AutoModelForCausalLM
    from tropd_kernels.oracle import teacher_topk_oracle

    from tropd_ds.teacher_wire import decode_answer

    body, ids, mask, targets = good_request(workspace)
    status, payload = post(guarded, "score", body)
    assert status == 200, payload
    found, _ = decode_answer(payload)
    lm = AutoModelForCausalLM.from_pretrained(workspace / "teacher").eval()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1][targets]
    expected = teacher_topk_oracle(logits.float(), ids[:, 1:][targets], 5, 0.8)
    assert torch.equal(found.ids, expected.ids)
    for a, b in zip(found[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert isinstance(found, tk.TeacherTopK)
    request = urllib.request.Request(f"{guarded.url}/v1/info", headers={"Authorization": f"Bearer {SECRET}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        info = json.loads(answer.read())
    assert (info["n_tokens"], info["dtype"], info["max_positions"], info["ranks"]) == (18, "float32", 128, 1)
    assert info["max_rows"] == 8 and len(info["tokenizer_fingerprint"]) == 64


def test_every_bad_request_class_gets_its_reason_and_the_service_goes_on(workspace, guarded):
    from safetensors.torch import save as st_save

    body = good_request(workspace)[0]
    ids = torch.full((2, 7), 18, dtype=torch.int32)
    mask = torch.ones(2, 7, dtype=torch.uint8)
    cases = [
        ("no secret", post(guarded, "score", body, token=None), 401, "missing or wrong shared secret"),
        ("wrong secret", post(guarded, "score", body, token="guess"), 401, "missing or wrong shared secret"),
        ("not safetensors", post(guarded, "score", b"{}" * 10), 400, "bytes: expected at most 65536"),
        (
            "id past the vocabulary",
            post(
                guarded,
                "score",
                st_save(
                    {"input_ids": ids, "attention_mask": mask, "targets": mask[:, 1:].bool()},
                    metadata={"k": "2", "temperature": "1.0"},
                ),
            ),  # fmt: skip
            400,
            "token id 18 is outside the teacher's vocabulary [0, 18)",
        ),
        (
            "too many rows",
            post(
                guarded,
                "score",
                st_save(
                    {
                        "input_ids": torch.ones(9, 4, dtype=torch.int32),
                        "attention_mask": torch.ones(9, 4, dtype=torch.uint8),
                        "targets": torch.ones(9, 3, dtype=torch.bool),
                    },
                    metadata={"k": "2", "temperature": "1.0"},
                ),
            ),  # fmt: skip
            400,
            "9 rows: expected 1 to 8 per request (serve.max_rows)",
        ),
        (
            "longer than the positions",
            post(
                guarded,
                "score",
                st_save(
                    {
                        "input_ids": torch.ones(1, 129, dtype=torch.int32),
                        "attention_mask": torch.ones(1, 129, dtype=torch.uint8),
                        "targets": torch.ones(1, 128, dtype=torch.bool),
                    },
                    metadata={"k": "2", "temperature": "1.0"},
                ),
            ),  # fmt: skip
            400,
            "129 tokens per row: expected 2 to 128 (the teacher's positions)",
        ),
        ("too large", post(guarded, "score", b"x" * 60_000), 413, "request body over serve.max_request_mb=0.05 MB"),
        ("parity of nothing", post(guarded, "parity", b"junk"), 400, "expected a safetensors payload with input_ids"),
    ]
    for name, (status, payload), want_status, reason in cases:
        assert status == want_status, (name, status, payload)
        assert reason in json.loads(payload)["error"], (name, payload)
    status, payload = post(guarded, "score", body)  # still answering
    assert status == 200 and guarded.proc.poll() is None
