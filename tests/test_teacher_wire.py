"""The teacher service's contract without launching it: the checks every scoring request meets (each bad
request class refused with its reason), the answer's round trip, the service config's refusals (a bind beyond
loopback needs a secret), the tokenizer fingerprint (the run config's `teacher.url` rules are in
tests/test_config_checks.py), and the client's
handling of a busy, refusing or absent service (against a small aiohttp server in this process)."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch
import tropd_kernels as tk
import yaml
from safetensors.torch import save as st_save

from tropd_ds.config import ConfigError, RunConfig
from tropd_ds.rollout import RolloutTokens
from tropd_ds.teacher_client import RemoteTeacher, TeacherRefused, TeacherUnavailable
from tropd_ds.teacher_service import is_loopback, load_service_config
from tropd_ds.teacher_wire import BadRequest, decode_answer, decode_request, encode_answer, encode_request

N_TOKENS, POSITIONS, ROWS = 18, 64, 8


def request(rows=2, width=6, k=3, temperature=1.0, **change) -> bytes:
    ids = torch.arange(rows * width).reshape(rows, width) % N_TOKENS
    mask = torch.ones(rows, width, dtype=torch.uint8)
    mask[0, 0] = 0  # a left pad
    targets = mask[:, 1:].bool() & mask[:, :-1].bool()
    tensors = {"input_ids": ids.int(), "attention_mask": mask, "targets": targets}
    meta = {"k": str(k), "temperature": repr(temperature)}
    for key, value in change.items():
        if key in ("k", "temperature") or key.startswith("meta_"):
            meta[key.removeprefix("meta_")] = value
        elif value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return st_save(tensors, metadata=meta)


def refusal(payload: bytes) -> str:
    with pytest.raises(BadRequest) as info:
        decode_request(payload, N_TOKENS, POSITIONS, ROWS)
    return str(info.value)


def test_a_good_request_decodes_to_the_tensors_and_options_sent():
    ids, mask, targets, k, temperature = decode_request(request(k=5, temperature=0.7), N_TOKENS, POSITIONS, ROWS)
    assert ids.dtype == torch.int64 and ids.shape == (2, 6) and mask.dtype == torch.int64
    assert int(mask.sum()) == 11 and int(targets.sum()) == 9 and (k, temperature) == (5, 0.7)
    sent = encode_request(ids, mask, targets, k, temperature)  # what the client sends round-trips
    again = decode_request(sent, N_TOKENS, POSITIONS, ROWS)
    assert all(torch.equal(a, b) for a, b in zip(again[:3], (ids, mask, targets))) and again[3:] == (5, 0.7)


BAD = {
    "huge header": (b"hello, teacher", "bytes: expected at most 65536"),
    "header not json": (
        b"\x04\x00\x00\x00\x00\x00\x00\x00abcd",
        "the body is not a safetensors payload (its header is",
    ),
    "empty body": (b"", "the body is not a safetensors payload (shorter than its 8-byte header length)"),
    "missing targets": (
        request(targets=None),
        "expected the tensors input_ids, attention_mask, targets; missing targets",
    ),
    "extra tensor": (
        request(extra=torch.zeros(1)),
        "expected the tensors input_ids, attention_mask, targets; unexpected extra",
    ),
    "unknown header": (request(meta_top_p="0.9"), "unknown header keys ['top_p']: expected k and temperature"),
    "float ids": (request(input_ids=torch.zeros(2, 6)), "input_ids is torch.float32 [2, 6]: expected int32 or int64"),
    "too many rows": (request(rows=9), "9 rows: expected 1 to 8 per request (serve.max_rows)"),
    "too long": (request(width=65), "65 tokens per row: expected 2 to 64 (the teacher's positions)"),
    "one token": (request(width=1), "1 tokens per row: expected 2 to 64"),
    "mask shape": (request(attention_mask=torch.ones(2, 5, dtype=torch.uint8)), "attention_mask is torch.uint8 [2, 5]"),
    "mask values": (request(attention_mask=torch.full((2, 6), 2, dtype=torch.uint8)), "attention_mask holds values"),
    "targets shape": (
        request(targets=torch.ones(2, 6, dtype=torch.bool)),
        "targets is torch.bool [2, 6]: expected bool [2, 5]",
    ),
    "id past the vocabulary": (
        request(input_ids=torch.full((2, 6), N_TOKENS, dtype=torch.int32)),
        "token id 18 is outside the teacher's vocabulary [0, 18)",
    ),
    "negative id": (request(input_ids=torch.full((2, 6), -1, dtype=torch.int32)), "token id -1 is outside"),
    "target at a pad": (
        request(targets=torch.ones(2, 5, dtype=torch.bool)),
        "a target is selected at a padding position",
    ),
    "k zero": (request(k=0), "k=0: expected 1 to 18 (the vocabulary, at most serve.max_k)"),
    "k past the vocabulary": (request(k=19), "k=19: expected 1 to 18"),
    "k not a number": (request(k="many"), "k='many', temperature='1.0': expected numbers"),
    "temperature nan": (request(temperature=math.nan), "temperature=nan: expected a finite number > 0"),
    "temperature zero": (request(temperature=0.0), "temperature=0.0: expected a finite number > 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_request_class_is_refused_with_its_reason(case):
    payload, reason = BAD[case]
    assert reason in refusal(payload)


def test_a_request_is_bounded_in_tokens_and_k_besides_rows():
    with pytest.raises(BadRequest, match=r"^2 x 6 = 12 tokens: expected at most 11 \(serve.max_tokens\)$"):
        decode_request(request(), N_TOKENS, POSITIONS, ROWS, max_tokens=11)
    assert decode_request(request(), N_TOKENS, POSITIONS, ROWS, max_tokens=12)[0].shape == (2, 6)
    with pytest.raises(BadRequest, match=r"^k=5: expected 1 to 4 \(the vocabulary, at most serve.max_k\)$"):
        decode_request(request(k=5), N_TOKENS, POSITIONS, ROWS, max_k=4)


def test_an_answer_round_trips_as_a_teacher_topk_with_the_seconds():
    topk = tk.TeacherTopK(
        torch.tensor([[3, 1], [0, 17]]), torch.tensor([[-0.1, -2.5], [-0.5, -1.0]]),
        torch.tensor([-0.1, -7.0]), torch.tensor([0.4, 1.2]),
    )  # fmt: skip
    back, seconds = decode_answer(encode_answer(topk, 0.25))
    assert all(torch.equal(a, b) for a, b in zip(back, topk)) and back.ids.dtype == torch.int64
    assert seconds == 0.25


# ----------------------------------------------------------------------------- the service's config


def service_config(tmp_path, **serve) -> str:
    data = {"teacher": {"path": "teacher", "ds_config": "ds.json"}, "serve": serve}
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_service_binds_to_loopback_by_default_and_resolves_paths_against_its_file(tmp_path):
    cfg = load_service_config(service_config(tmp_path))
    assert cfg.serve.host == "127.0.0.1" and is_loopback(cfg.serve.host)
    assert cfg.teacher.path == str(tmp_path / "teacher") and cfg.teacher.ds_config == str(tmp_path / "ds.json")


def test_a_bind_beyond_loopback_needs_a_shared_secret(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_service_config(service_config(tmp_path, host="0.0.0.0"))
    assert str(info.value) == (
        "serve.host='0.0.0.0' is reachable from other machines: set serve.token_file to a file holding a shared "
        "secret (every request must carry it), or serve on loopback (127.0.0.1)"
    )
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match=r"serve.token_file=.*short' holds 3 characters: expected a secret of at"):
        load_service_config(service_config(tmp_path, host="0.0.0.0", token_file="short"))
    (tmp_path / "token").write_text("0123456789abcdef0123\n")
    cfg = load_service_config(service_config(tmp_path, host="0.0.0.0", token_file="token"))
    assert cfg.serve.token_file == str(tmp_path / "token")
    assert not is_loopback("10.0.0.5") and is_loopback("::1") and is_loopback("localhost")


@pytest.mark.parametrize(
    ("serve", "message"),
    [
        ({"port": 70000}, "serve.port=70000: expected 0 (any free port) to 65535"),
        ({"max_rows": 0}, "serve.max_rows=0: expected a number >= 1"),
        ({"max_request_mb": 0}, "serve.max_request_mb=0.0: expected a number > 0"),
        ({"backlog": 3}, "unknown config key 'serve.backlog'"),
    ],
)
def test_the_service_config_refuses_values_that_cannot_work(tmp_path, serve, message):
    with pytest.raises(ConfigError) as info:
        load_service_config(service_config(tmp_path, **serve))
    assert str(info.value).startswith(message)


def test_a_service_config_does_not_take_a_teacher_url(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.url='http://a:1' in a service config: the service runs"):
        load_service_config(service_config(tmp_path), ["teacher.url=http://a:1"])


def test_the_tokenizer_fingerprint_follows_what_ids_mean():
    from tropd_ds.demo_task import build_tokenizer
    from tropd_ds.teacher_wire import tokenizer_fingerprint

    tok, same = build_tokenizer(), build_tokenizer()
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(same)
    same.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(same)


# ----------------------------------------------------------------------------- the client


class FakeService:
    """A stand-in for the service's HTTP side, in this process: answers `script` in order (status, body)."""

    def __init__(self, script):
        from aiohttp import web

        self.script, self.seen = list(script), []

        async def score(request):
            self.seen.append((request.headers.get("Authorization"), await request.read()))
            status, body = self.script.pop(0) if len(self.script) > 1 else self.script[0]
            if status is None:  # a service gone silent: no answer, and no health route (404)
                await asyncio.sleep(3)  # longer than the client waits; bounds the clean-up
            headers = {"Retry-After": "0.05"} if status == 503 else None
            return web.Response(status=status, body=body, headers=headers)

        app = web.Application()
        app.router.add_post("/v1/score", score)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


def rollout_tokens() -> RolloutTokens:
    ids = torch.tensor([[1, 4, 5, 2], [0, 3, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    sampled = torch.tensor([[False, True, True], [False, True, True]])
    return RolloutTokens(ids, mask, sampled, torch.zeros_like(sampled))


def answer(n: int) -> bytes:
    topk = tk.TeacherTopK(torch.arange(2 * n).reshape(n, 2) % 18, -torch.rand(n, 2), -torch.rand(n), torch.rand(n))
    return encode_answer(topk, 0.0)


def options(k=2):
    from tropd_ds.objectives import StepOptions

    return StepOptions(k, tk.KernelOptions(1.0))


def score_with(script, raises=None, micro_batch: int = 2, **client):
    """`rollout_tokens()` scored by a RemoteTeacher against a FakeService answering `script`; both closed after.
    Returns the fake and the answer per student micro-batch, or (with `raises`) the exception of that type."""
    fake = FakeService(script)
    remote = RemoteTeacher(fake.url, **client)
    try:
        if raises is None:
            return fake, remote.score(rollout_tokens(), options(), micro_batch)
        with pytest.raises(raises) as info:
            remote.score(rollout_tokens(), options(), micro_batch)
        return fake, info.value
    finally:
        remote.close()
        fake.close()


def test_a_busy_service_is_waited_for_and_the_answer_is_cut_per_student_micro_batch():
    body = answer(4)
    script = [(503, b'{"error": "busy"}'), (503, b'{"error": "busy"}'), (200, body)]
    fake, parts = score_with(script, micro_batch=1, token="s" * 20, wait_minutes=0.001)  # busy is not a failure
    expected, _ = decode_answer(body)
    assert [p.ids.shape[0] for p in parts] == [2, 2]  # two targets per row, one row per micro-batch
    assert torch.equal(torch.cat([p.logprobs for p in parts]), expected.logprobs)
    assert len(fake.seen) == 3 and all(auth == "Bearer " + "s" * 20 for auth, _ in fake.seen)
    sent = decode_request(fake.seen[-1][1], N_TOKENS, POSITIONS, ROWS)
    assert torch.equal(sent[2], rollout_tokens().targets) and sent[3:] == (2, 1.0)


def test_a_refusal_is_raised_at_once_with_the_services_reason():
    script = [(400, b'{"error": "token id 99 is outside the teacher\'s vocabulary [0, 18)"}')]
    fake, refused = score_with(script, TeacherRefused, wait_minutes=5)
    assert str(refused) == (
        f"the teacher service at {fake.url} refused score: HTTP 400: token id 99 is outside the teacher's "
        "vocabulary [0, 18)"
    )
    assert len(fake.seen) == 1


def test_a_service_that_does_not_answer_is_retried_for_wait_minutes_then_named():
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens there once closed
    logged = []
    remote = RemoteTeacher(f"http://127.0.0.1:{port}", wait_minutes=0.02, log=logged.append)  # 1.2 s
    start = time.monotonic()
    try:
        with pytest.raises(TeacherUnavailable) as info:
            remote.score(rollout_tokens(), options(), 2)
    finally:
        remote.close()
    assert 1.2 <= time.monotonic() - start < 10
    assert str(info.value).startswith(
        f"the teacher service at http://127.0.0.1:{port} did not answer for 1 s (teacher.wait_minutes=0.02): "
    )
    assert "Connect" in str(info.value)  # the last failure, named
    assert logged[0].startswith(f"the teacher service at http://127.0.0.1:{port} does not answer (")


def test_a_server_error_is_retried_and_a_recovered_service_answers():
    body = answer(4)
    logged = []
    fake, parts = score_with([(500, b'{"error": "scoring failed"}'), (200, body)], wait_minutes=1, log=logged.append)
    assert len(parts) == 1 and parts[0].ids.shape == (4, 2) and len(fake.seen) == 2
    assert logged == [
        f"the teacher service at {fake.url} does not answer (HTTP 500: scoring failed); retrying for up to 1 min",
        f"the teacher service at {fake.url} answers again",
    ]


def test_a_served_teachers_empty_path_is_not_fingerprinted_as_the_working_folder(tmp_path, monkeypatch):
    """teacher.path is empty with teacher.url: the run's identity must not hash the folder the run starts in
    (Path("") is "."), or every resume from elsewhere, or after a file changed there, would be refused."""
    from tropd_ds.config import RunConfig
    from tropd_ds.ownership import fingerprint, run_identity

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig()
    cfg.teacher.url = "http://127.0.0.1:8471"
    before = run_identity(cfg, 2)["fingerprints"]["teacher.path"]
    (tmp_path / "new_file").write_text("changed")
    assert before == run_identity(cfg, 2)["fingerprints"]["teacher.path"] == fingerprint("") == "no path"


def test_a_request_the_service_keeps_failing_is_refused_and_a_throttle_is_a_wait():
    script = [(429, b'{"error": "slow down"}'), (500, b'{"error": "scoring failed: OOM"}')]
    fake, refused = score_with(script, TeacherRefused, wait_minutes=5, log=lambda _: None)
    assert str(refused) == (
        f"the teacher service at {fake.url} failed on score 3 times in a row: HTTP 500: scoring failed: OOM"
    )
    assert len(fake.seen) == 4  # the 429 waited, then three failures


def test_a_service_gone_silent_during_a_request_is_a_failure_not_a_wait(monkeypatch):
    from tropd_ds import teacher_client

    monkeypatch.setattr(teacher_client, "HEALTH_EVERY_S", 0.1)
    monkeypatch.setattr(teacher_client, "HEALTH_GRACE_S", 0.3)
    _, gone = score_with([(None, b"")], TeacherUnavailable, wait_minutes=0.01, log=lambda _: None)
    assert "its health went unanswered for 0 s during a request" in str(gone)


def test_the_services_limits_are_checked_before_step_1():
    """What the service would refuse hours into a run is refused at its start, naming the setting and the limit."""
    from types import SimpleNamespace

    from tropd_ds.objectives import loss_fn
    from tropd_ds.train import check_service_limits

    cfg = RunConfig()
    cfg.teacher.url = "http://t:1"
    cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens = 100, 28  # 128 positions
    prepared = SimpleNamespace(objective=loss_fn("tropd", k=16))
    info = {"max_positions": 128, "max_rows": 8, "max_tokens": 8 * 128, "max_k": 16}
    check_service_limits(cfg, prepared, info, world=2)  # 8 prompts / 2 ranks x 2 samples = 8 rows
    for change, message in (
        ({"max_positions": 127}, "data.max_prompt_tokens + rollout.max_new_tokens is 128, more than the teacher "
         "service at http://t:1 takes (positions 127)"),
        ({"max_rows": 7}, "rows per request (rollout.micro_batch_size, or a rank's rollouts) is 8, more than"),
        ({"max_tokens": 1023}, "tokens per request at the longest is 1024, more than"),
        ({"max_k": 8}, "the objective's k is 16, more than the teacher service at http://t:1 takes (max_k 8)"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as refused:
            check_service_limits(cfg, prepared, {**info, **change}, world=2)
        assert str(refused.value).startswith(message)
    cfg.rollout.micro_batch_size = 4  # requests of 4 rows
    check_service_limits(cfg, prepared, {**info, "max_rows": 4, "max_tokens": 4 * 128}, world=2)
