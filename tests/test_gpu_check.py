"""The GPU check without a GPU: its run config passes the trainer's checks, its plan fits its budget, and
its rehearsal (the whole flow on the CPU, the CUDA-only parts made small) writes its results step by step,
in at most 8 files, and stays valid when a tiny budget cuts the steps off."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

STEPS = list(gpu_check.SHARES)


def test_gpu_run_config_builds_no_op_and_writes_under_its_folder(tmp_path):
    # the trainer's pre-flight on this config is the rehearsal's env step (test below)
    from tropd_ds.config import load_config

    cfg = load_config(gpu_check.run_config(tmp_path, 10))
    assert cfg.student.dtype == cfg.teacher.dtype == "bfloat16" and cfg.optim.steps == 10
    ds = json.loads(Path(cfg.student.ds_config).read_text())
    assert ds["bf16"]["enabled"] and ds["optimizer"]["params"]["torch_adam"] is True  # no FusedAdam build
    assert "tensorboard" not in ds
    assert str(tmp_path / "run") in cfg.logging.dir and str(tmp_path / "run") in cfg.checkpoint.dir
    teacher = json.loads(Path(cfg.teacher.ds_config).read_text())
    assert teacher["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_the_kernel_test_files_exist():
    assert all((ROOT / path).is_file() for path in gpu_check.KERNEL_TESTS)


@pytest.mark.parametrize("budget", [8, 60, 420, 600])
def test_the_step_limits_and_graces_sum_within_the_budget(budget):
    plan = gpu_check.plan(budget)
    used = sum(plan["timeouts_s"].values()) + plan["grace_s"] * len(STEPS)
    assert list(plan["timeouts_s"]) == STEPS
    assert used + plan["reserve_s"] == pytest.approx(budget, abs=0.01) and plan["reserve_s"] > 0.05 * budget
    if budget == 420:  # what the device has: one command of at most 600 s, wheels installed first
        assert used < 400 and plan["timeouts_s"]["train"] >= 150


def test_the_device_command_is_in_the_docstring_and_the_docs():
    command = gpu_check.DEVICE_COMMAND
    assert len(command) < 2000 and "\n" not in command  # one line, within the device tool's limit
    assert command in gpu_check.__doc__
    docs = (ROOT / "docs/GPU.md").read_text()
    # before a GPU run the page says so; after, it is the check's own page (copied over it), with its results
    assert gpu_check.how_to_run() in docs and ("No GPU run has happened yet" in docs or "Mode: gpu" in docs)


def test_require_gpu_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--require-gpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def check_out_folder(out: Path) -> dict:
    files = sorted(p.name for p in out.iterdir())
    assert all(out.joinpath(f).is_file() for f in files)
    assert len(files) <= gpu_check.MAX_RESULT_FILES, files
    assert set(files) <= set(gpu_check.RESULT_FILES), files
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.rehearsal  # two real training steps: `make rehearse`
def test_the_rehearsal_writes_each_step_as_it_completes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # a roomy budget: a busy CI machine must not cut the rehearsal's steps (the next test cuts them on purpose)
    cmd = [
        sys.executable,
        "scripts/gpu_check.py",
        "--rehearse",
        "--budget",
        "900",
        "--out",
        str(out),
        "--work",
        str(work),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []  # (statuses, files) each time gpu_check.json changed, read while the check runs
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        path = out / "gpu_check.json"
        if path.is_file():
            result = json.loads(path.read_text())  # valid at every moment: written through a rename
            snapshot = ([result["steps"][s]["status"] for s in STEPS], sorted(p.name for p in out.iterdir()))
            if not seen or seen[-1] != snapshot:
                seen.append(snapshot)
        time.sleep(0.2)
    output = proc.communicate(timeout=max(1, deadline - time.monotonic()))[0]
    assert proc.returncode == 0, output[-3000:]
    result = check_out_folder(out)
    assert result["status"] == "passed" and result["mode"].startswith("rehearsal")
    # seen from outside while it ran: the env step done and its log there before the run had started
    assert any(s[0][0] == "passed" and s[0][3] in ("pending", "running") and "env.log" in s[1] for s in seen), seen
    # and as the check recorded it: after each step, that step's log and none of a later step's
    writes = {w["after"]: w["files"] for w in result["writes"]}
    for i, step in enumerate(STEPS):
        assert {"gpu_check.json", "GPU.md", gpu_check.LOGS[step]} <= set(writes[step]), writes[step]
        assert not {gpu_check.LOGS[later] for later in STEPS[i + 1 :]} & set(writes[step]), writes[step]
    steps = result["steps"]
    assert all(steps[s]["status"] == "passed" and steps[s]["seconds"] <= steps[s]["limit_s"] for s in STEPS)
    env = steps["env"]["summary"]
    assert not env["errors"] and env["train_rows"] > 0 and env["student_optimizer"]["params"]["torch_adam"]
    kernels = steps["kernels"]["summary"]
    assert kernels["counts"].get("passed", 0) >= 5 and not kernels["failed"]
    bench = steps["bench"]["summary"]
    assert bench["status"] == "complete" and bench["rows"] and not bench["errors"]
    assert len(bench["rollout"]["rows"]) == 4 and all(r["same_tokens_as_first"] for r in bench["rollout"]["rows"])
    train = steps["train"]["summary"]
    assert train["steps_done"] == train["steps_planned"] == 2 and train["exported"]
    assert train["jit_builds_refused"] == []
    assert any("loss" in r for r in train["metrics"])
    assert (out / "metrics.jsonl").read_text().count("\n") >= 2
    md = (out / "GPU.md").read_text()
    assert "Status: **passed**" in md and "| train | passed | 0 |" in md and "## How to run" in md
    assert "### Rollout decode" in md and "| preallocated, ask every 16 |" in md


@pytest.mark.rehearsal  # the check's flow under a 10 s budget: `make rehearse`
def test_a_budget_too_small_cuts_the_steps_off_and_leaves_valid_results(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    budget = 10
    cmd = [sys.executable, "scripts/gpu_check.py", "--rehearse", "--budget", str(budget)]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd + ["--out", str(out), "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = check_out_folder(out)
    assert result["status"].startswith("budget spent")
    assert result["elapsed_s"] <= budget and wall < budget + 10
    statuses = {s: result["steps"][s]["status"] for s in STEPS}
    # a quick step may still pass within its share (the smoke bench on a quiet machine); none fails
    assert set(statuses.values()) <= {"passed", "timeout", "not run: budget spent"}, statuses
    cut = [s for s, status in statuses.items() if status == "timeout"]
    assert cut, statuses  # at least one step was stopped by its limit, its log kept
    for step in cut:
        assert (out / gpu_check.LOGS[step]).is_file()
        assert result["steps"][step]["limit_s"] <= gpu_check.plan(budget)["timeouts_s"][step]
    assert "budget spent" in (out / "GPU.md").read_text()
