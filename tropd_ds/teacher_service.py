"""The teacher as a service: `tropd-ds serve-teacher --config teacher.yaml`, or on several ranks
`deepspeed --num_gpus N --module tropd_ds.teacher_service --config teacher.yaml`.

The teacher runs under its own DeepSpeed engine (ZeRO-3 over the service's ranks, offload as its DeepSpeed
config says), exactly as inside a training run (`scoring.teacher_engine`, `scoring.score`). Rank 0 answers
HTTP (aiohttp) on `serve.host:serve.port`:

- `GET /v1/info`: what is served (model, tokenizer fingerprint, vocabulary, dtype, positions, end ids, ranks);
- `GET /v1/health`: 200 while the service takes requests;
- `POST /v1/score`: a scoring request (tropd_ds.teacher_wire: safetensors in, the TeacherTopK of every selected
  target out);
- `POST /v1/parity`: the teacher's log-probs against its model's own forward on the given ids (the trainer's
  check before step 1).

Requests are validated on rank 0 (size, rows, tokens, shapes, ids within the vocabulary, lengths within the
model's positions, k, temperature) and queued; the ranks take one request at a time, cut it into the
teacher's micro-batches as a run's own teacher would and take turns at them, and rank 0 answers. A failure
while scoring ends a service of several ranks (they could no longer agree on their collectives); a
one-rank service answers HTTP 500 and goes on. A bad request gets HTTP 400 with the reason and changes
nothing; a full queue answers 503 (the trainer waits and retries). The service binds to loopback unless
told otherwise, and any other address needs `serve.token_file`, a shared secret every request carries
(`Authorization: Bearer`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import ipaddress
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import collectives, process
from .config import (
    RANGES,
    ConfigError,
    TeacherConfig,
    _build,
    _parse_override,
    _range_text,
    is_hub_id,
    parse_file,
)
from .exit_codes import ExitCode
from .teacher_wire import API, CONTENT_TYPE, BadRequest, decode_request, encode_answer, tokenizer_fingerprint

HEARTBEAT_S = 2.0  # rank 0 tells the other ranks "nothing yet" this often, so no collective waits long


@dataclass
class ServeSection:
    host: str = "127.0.0.1"  # the address to listen on; any but loopback needs token_file
    port: int = 8471  # 0: any free port (see address_file)
    token_file: str = ""  # a file holding the shared secret every request must carry (Authorization: Bearer ...)
    address_file: str = ""  # written once the service listens: its URL (for scripts, and for port 0)
    max_request_mb: float = 512.0  # larger request bodies are refused (HTTP 413)
    max_rows: int = 4096  # rows per scoring request
    max_tokens: int = 4194304  # rows x tokens per scoring request (what one request can make the teacher hold)
    max_k: int = 1024  # the largest top-k a request may ask for
    max_queue: int = 64  # requests waiting for the teacher; more are answered 503 (clients wait and retry)


@dataclass
class ServiceConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    serve: ServeSection = field(default_factory=ServeSection)
    # how long a collective among the service's ranks waits for the slowest (see the run config's)
    collective_timeout_minutes: float = 240.0


def load_service_config(path: str | Path, overrides: list[str] = ()) -> ServiceConfig:
    """A service config (YAML or JSON: `teacher:` as in a run config, `serve:`), with `--set` overrides; paths
    relative to the file; refused with the reason where a value cannot work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    data = parse_file(path) or {}
    if not isinstance(data, dict):
        _build(ServiceConfig, data, "")
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key!r} is not a section")
        node[keys[-1]] = value
    cfg = _build(ServiceConfig, data, "")
    base = path.resolve().parent
    for section, name in (("teacher", "path"), ("teacher", "ds_config"), ("serve", "token_file"),
                          ("serve", "address_file")):  # fmt: skip
        sub = getattr(cfg, section)
        value = os.path.expanduser(getattr(sub, name))
        hub = (section, name) == ("teacher", "path") and is_hub_id(value, base)
        if value and not Path(value).is_absolute() and not hub:
            value = str((base / value).resolve())
        setattr(sub, name, value)
    t, s = cfg.teacher, cfg.serve
    if t.url:
        raise ConfigError(f"teacher.url={t.url!r} in a service config: the service runs the teacher (teacher.path)")
    for key in ("path", "ds_config"):
        if not getattr(t, key):
            raise ConfigError(f"teacher.{key} is empty: the service needs the teacher's model and DeepSpeed config")
    if t.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"teacher.dtype={t.dtype!r}: expected one of float32, bfloat16, float16")
    lo, lo_in, hi, hi_in = RANGES[("teacher", "micro_batch_size")]
    if t.micro_batch_size < lo:
        accepted = _range_text(lo, lo_in, hi, hi_in)
        raise ConfigError(f"teacher.micro_batch_size={t.micro_batch_size}: expected {accepted}")
    if isinstance(t.gather_params, str) and t.gather_params.lower() in ("true", "false"):
        t.gather_params = t.gather_params.lower() == "true"
    if t.gather_params not in (True, False, "auto"):
        raise ConfigError(f"teacher.gather_params={t.gather_params!r}: expected true, false or auto")
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"serve.port={s.port}: expected 0 (any free port) to 65535")
    for key in ("max_rows", "max_tokens", "max_k", "max_queue"):
        if getattr(s, key) < 1:
            raise ConfigError(f"serve.{key}={getattr(s, key)}: expected a number >= 1")
    if not math.isfinite(s.max_request_mb) or s.max_request_mb <= 0:
        raise ConfigError(f"serve.max_request_mb={s.max_request_mb}: expected a number > 0")
    timeout = cfg.collective_timeout_minutes
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"collective_timeout_minutes={timeout!r}: expected a number of minutes > 0")
    if not is_loopback(s.host) and not s.token_file:
        raise ConfigError(
            f"serve.host={s.host!r} is reachable from other machines: set serve.token_file to a file holding a shared "
            "secret (every request must carry it), or serve on loopback (127.0.0.1)"
        )
    if s.token_file:
        read_token(s.token_file, "serve.token_file")
    return cfg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str, key: str) -> str:
    """The shared secret in `path` (surrounding whitespace ignored); refused when missing, empty or short."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}={path!r} cannot be read: {exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"{key}={path!r} holds {len(token)} characters: expected a secret of at least 16")
    return token


# ------------------------------------------------------------------------------------------ the ranks' work


@dataclass
class Job:
    kind: str  # "score" | "parity"
    args: tuple
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, repr=False)


def score_rows(teacher, ids, mask, targets, k: int, temperature: float, micro_batch: int, gather: bool, device):
    """The TeacherTopK of every selected target of the request, in row-major order (on rank 0; a collective). The
    rows are cut into the teacher's micro-batches as a run's own teacher cuts them (`scoring.teacher_batches`),
    and the service's ranks take turns at them: every row is scored in the company it would have in the run."""
    import tropd_kernels as tk

    from .rollout import RolloutTokens
    from .scoring import gathered, in_row_order, teacher_batches

    rank, world = collectives.rank_world()
    tokens = RolloutTokens(ids.to(device), mask.to(device), targets.to(device), torch.zeros_like(targets).to(device))
    order, batches = teacher_batches(tokens, micro_batch)
    rounds = -(-len(batches) // world)
    mine = {}
    with gathered(teacher, gather):
        for i in range(rounds):
            index = i * world + rank
            if index < len(batches):
                rows = batches[index]
                found = teacher(rows.input_ids, rows.attention_mask, rows.targets, k, temperature)
                mine[index] = tk.TeacherTopK(*(t.cpu() for t in found))
            else:  # every forward of a ZeRO-3 engine is a collective (its start-of-forward hook, gathered or not)
                rows = batches[0]
                teacher(rows.input_ids, rows.attention_mask, rows.targets, k, temperature)
    if world > 1:  # only rank 0 answers, so only rank 0 holds every part
        shares = collectives.gather_object(mine)
        if rank != 0:
            return None
        mine = {index: part for share in shares for index, part in share.items()}
    parts = [mine[index] for index in range(len(batches))]
    return tk.TeacherTopK(*in_row_order(parts, tokens, order))


def teacher_parity(teacher, ids, device) -> dict:
    """The largest and mean |difference| between the teacher's log-probs as scored here and its model's own forward
    on `ids` [1, T] (a collective on several ranks)."""
    from .preflight import model_parity

    ids = ids.to(device)
    worst, mean = model_parity(teacher.module, ids, torch.ones_like(ids))
    return {"max": worst, "mean": mean}


def work(job_args, teacher, cfg: ServiceConfig, gather: bool, device):
    kind, args = job_args
    if kind == "score":
        return score_rows(teacher, *args, cfg.teacher.micro_batch_size, gather, device)
    return teacher_parity(teacher, args[0], device)


# ---------------------------------------------------------------------------------------------- rank 0's HTTP


def json_error(status: int, message: str, **headers):
    from aiohttp import web

    return web.json_response({"error": message}, status=status, headers=headers or None)


def make_app(info: dict, jobs: queue.Queue, token: str | None, limits: dict):
    """The aiohttp application: the four endpoints, the shared-secret check and the size limit."""
    from aiohttp import web

    @web.middleware
    async def authorise(request, handler):
        if token is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                return json_error(401, "missing or wrong shared secret (Authorization: Bearer <serve.token_file>)")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                return json_error(413, f"request body over serve.max_request_mb={limits['max_request_mb']:g} MB")
            raise

    async def run_job(kind: str, args: tuple):
        job = Job(kind, args)
        try:
            jobs.put_nowait(job)
        except queue.Full:
            return None
        return await asyncio.wrap_future(job.future)

    async def score(request):
        if jobs.full():  # before the body is read: a busy service does not hold every waiting client's request
            return json_error(503, f"busy: {limits['max_queue']} requests are waiting", **{"Retry-After": "1"})
        body = await request.read()
        loop = asyncio.get_running_loop()
        bounds = (info["n_tokens"], info["max_positions"], limits["max_rows"], limits["max_tokens"], limits["max_k"])
        try:
            args = await loop.run_in_executor(None, decode_request, body, *bounds)
        except BadRequest as exc:
            return json_error(400, str(exc))
        start = time.perf_counter()
        try:
            topk = await run_job("score", args)
        except Exception as exc:  # the teacher failed on this request; the service goes on
            return json_error(500, f"scoring failed: {type(exc).__name__}: {exc}")
        if topk is None:
            return json_error(503, f"busy: {limits['max_queue']} requests are waiting", **{"Retry-After": "1"})
        payload = await loop.run_in_executor(None, encode_answer, topk, time.perf_counter() - start)
        return web.Response(body=payload, content_type=CONTENT_TYPE)

    async def parity(request):
        from safetensors.torch import load as st_load

        body = await request.read()
        try:
            ids = st_load(body)["input_ids"].long()
            if ids.dim() != 2 or ids.shape[0] != 1 or not 2 <= ids.shape[1] <= 512:
                raise BadRequest(f"input_ids of shape {list(ids.shape)}: expected [1, 2..512]")
            if int(ids.min()) < 0 or int(ids.max()) >= info["n_tokens"]:
                raise BadRequest(f"a token id outside the teacher's vocabulary [0, {info['n_tokens']})")
        except BadRequest as exc:
            return json_error(400, str(exc))
        except Exception as exc:
            return json_error(400, f"expected a safetensors payload with input_ids ({type(exc).__name__}: {exc})")
        result = await run_job("parity", (ids,))
        if result is None:
            return json_error(503, "busy", **{"Retry-After": "1"})
        return web.json_response(result)

    async def get_info(request):  # noqa: ARG001
        return web.json_response(info)

    async def health(request):  # noqa: ARG001
        return web.json_response({"ok": True, "waiting": jobs.qsize()})

    app = web.Application(middlewares=[authorise], client_max_size=int(limits["max_request_mb"] * 2**20))
    app.add_routes([
        web.get(f"/{API}/info", get_info),
        web.get(f"/{API}/health", health),
        web.post(f"/{API}/score", score),
        web.post(f"/{API}/parity", parity),
    ])  # fmt: skip
    return app


def start_http(app, host: str, port: int) -> tuple[threading.Thread, int]:
    """Serve `app` from a thread of its own; returns the thread and the port it listens on."""
    from aiohttp import web

    ready: concurrent.futures.Future = concurrent.futures.Future()

    def serve_forever():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(app, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, host, port)
            loop.run_until_complete(site.start())
            ready.set_result(site._server.sockets[0].getsockname()[1])
        except Exception as exc:  # the address is taken, or not this machine's
            ready.set_exception(exc)
            return
        loop.run_forever()

    thread = threading.Thread(target=serve_forever, name="teacher-http", daemon=True)
    thread.start()
    return thread, ready.result(timeout=60)


# ------------------------------------------------------------------------------------------------ the service


def serve(cfg: ServiceConfig, stop: process.StopRequest) -> int:
    from .models import load_tokenizer, read_model_config
    from .scoring import teacher_engine

    log = process.log
    device = process.start_distributed(cfg.collective_timeout_minutes)
    rank, world = collectives.rank_world()
    tokenizer = load_tokenizer(cfg.teacher.path, "teacher")
    model_config = read_model_config(Path(cfg.teacher.path), "teacher")
    n_tokens = len(tokenizer)
    teacher, _keep = teacher_engine(cfg.teacher, n_tokens)
    gather = cfg.teacher.gather_params
    if gather == "auto":
        gather, why = process.gather_decision(teacher, device)
        log(f"teacher.gather_params=auto: {why}")
    process.set_collective_timeout(cfg.collective_timeout_minutes)
    from . import __version__
    from .rollout import end_token_ids

    info = {
        "api": API,
        "version": __version__,
        "model": cfg.teacher.path,
        "model_type": model_config.get("model_type"),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "n_tokens": n_tokens,
        "head_rows": int(model_config.get("vocab_size", n_tokens)),
        "dtype": cfg.teacher.dtype,
        "max_positions": int(model_config.get("max_position_embeddings") or 1 << 20),
        "end_ids": list(end_token_ids(tokenizer, teacher.module.lm)),
        "ranks": world,
        "gather_params": bool(gather),
        "max_rows": cfg.serve.max_rows,
        "max_tokens": cfg.serve.max_tokens,
        "max_k": cfg.serve.max_k,
        "max_request_mb": cfg.serve.max_request_mb,
    }
    jobs: queue.Queue = queue.Queue(maxsize=cfg.serve.max_queue)
    if rank == 0:
        token = read_token(cfg.serve.token_file, "serve.token_file") if cfg.serve.token_file else None
        limits = dataclasses.asdict(cfg.serve)
        try:
            _thread, port = start_http(make_app(info, jobs, token, limits), cfg.serve.host, cfg.serve.port)
        except OSError as exc:
            log(f"error: cannot listen on {cfg.serve.host}:{cfg.serve.port}: {exc.strerror or exc}")
            process.leave_now(ExitCode.CONFIG, f"serve.host / serve.port: {exc.strerror or exc}")
        url = f"http://{cfg.serve.host if ':' not in cfg.serve.host else f'[{cfg.serve.host}]'}:{port}"
        if cfg.serve.address_file:
            tmp = Path(cfg.serve.address_file + ".tmp")
            tmp.write_text(url + "\n")
            tmp.replace(cfg.serve.address_file)
        log(
            f"serving {cfg.teacher.path} ({n_tokens} tokens, {cfg.teacher.dtype}, {world} ranks) at {url}; "
            f"{'a shared secret is required' if token else 'loopback only, no secret'}"
        )
    stop.phase = "serving"
    served = 0
    while True:
        job = None
        if rank == 0:
            try:
                job = jobs.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                job = None
        message = collectives.broadcast_object(None if job is None else (job.kind, job.args))
        if message is None:
            continue
        try:
            result = work(message, teacher, cfg, gather, device)
        except Exception as exc:
            if rank == 0 and not job.future.done():
                job.future.set_exception(exc)
            if world > 1:  # the ranks may now be in different collectives: end the service, loudly
                process.leave_now(
                    ExitCode.IO,
                    f"scoring failed on rank {rank} ({type(exc).__name__}: {exc}); the service's ranks can no longer "
                    "agree, so the service stops: start it again (trainers wait for it for teacher.wait_minutes)",
                )
            log(f"a request failed: {type(exc).__name__}: {exc}")
            continue
        served += 1
        if rank == 0 and not job.future.done():
            job.future.set_result(result)


def main(argv=None) -> int:
    import argparse

    stop = process.StopRequest()  # a signal ends the service at once: nothing is lost
    p = argparse.ArgumentParser(prog="tropd-ds serve-teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the service's YAML or JSON config (teacher:, serve:)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    try:
        cfg = load_service_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"tropd-ds serve-teacher: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        return serve(cfg, stop)
    except ConfigError as exc:
        process.log(f"configuration error: {exc}")
        return ExitCode.CONFIG


if __name__ == "__main__":
    process.exit_without_teardown(main())
