"""A served teacher, as the trainer sees it (`teacher.url`): scoring requests to `tropd-ds serve-teacher`
(tropd_ds/teacher_service.py), sent from a thread of their own so that they are in flight while the student
generates the next rows, and answered as the in-job teacher's `scoring.score` is: one TeacherTopK per student
micro-batch.

A service that does not answer (down, restarting, unreachable) is retried with back-off for
`teacher.wait_minutes`, then `TeacherUnavailable` names the URL and the last failure; the trainer stops with
a checkpoint of its last completed step. A busy service (HTTP 503) is waited for without limit: slow is not
an error. A request the service refuses (HTTP 4xx) raises `TeacherRefused` with its reason at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import torch

from .config import ConfigError
from .teacher_wire import API, CONTENT_TYPE, decode_answer, encode_request

MAX_BACKOFF_S = 15.0
WAIT_STATUSES = (503, 429, 408)  # busy, too many requests, a proxy's time-out: the service is there, wait
SAME_FAILURES = 3  # a request the service fails on this many times in a row is refused, not retried again
# While an answer is awaited the service's health is asked every HEALTH_EVERY_S: a service whose health has not
# answered for HEALTH_GRACE_S (a frozen host, a connection gone silent) has failed that request
HEALTH_EVERY_S, HEALTH_GRACE_S, HEALTH_TIMEOUT_S = 30.0, 120.0, 10.0


class TeacherUnavailable(RuntimeError):
    """The teacher service did not answer within teacher.wait_minutes."""


class TeacherRefused(ConfigError):
    """The teacher service refused a request (HTTP 4xx), with its reason."""


class RemoteTeacher:
    """A client of one teacher service. `score` is `scoring.score` against the service; `submit` sends rows and
    returns a future of their TeacherTopK; `waited_s` adds up the time the caller spent waiting for answers."""

    def __init__(self, url: str, token: str | None = None, wait_minutes: float = 30.0, log=print):
        self.url, self.token, self.wait_s, self.log = url.rstrip("/"), token, 60.0 * wait_minutes, log
        self.waited_s = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()
        self._session = self._call(self._open()).result()

    async def _open(self):
        import aiohttp

        # no read time-out: a long answer is a wait; a connection that cannot be made is a failure, retried
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    def _call(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._session.close()).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """The answer's body, retrying what a restarted or busy service would answer later."""
        import aiohttp

        headers = {"Content-Type": CONTENT_TYPE}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        first_failure, delay, said, errors = None, 0.5, False, 0
        where = f"the teacher service at {self.url}"
        while True:
            try:
                status, data, retry_after = await self._watched(self._exchange(method, path, body, headers))
                if status == 200:
                    if said:
                        self.log(f"{where} answers again")
                    return data
                reason = _reason(data)
                if status in WAIT_STATUSES:  # busy: a wait, not a failure
                    first_failure = None
                    await asyncio.sleep(min(MAX_BACKOFF_S, float(retry_after or 1)))
                    continue
                if 400 <= status < 500:
                    raise TeacherRefused(f"{where} refused {path}: HTTP {status}: {reason}")
                failure = f"HTTP {status}: {reason}"
                errors += 1
                if errors >= SAME_FAILURES:  # the service is up and fails on this very request
                    raise TeacherRefused(f"{where} failed on {path} {errors} times in a row: {failure}")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                errors = 0
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            if now - first_failure >= self.wait_s:
                raise TeacherUnavailable(
                    f"the teacher service at {self.url} did not answer for {now - first_failure:.0f} s "
                    f"(teacher.wait_minutes={self.wait_s / 60:g}): {failure}"
                )
            if not said:
                self.log(f"the teacher service at {self.url} does not answer ({failure}); retrying for up to "
                         f"{self.wait_s / 60:g} min")  # fmt: skip
                said = True
            await asyncio.sleep(min(delay, max(0.0, self.wait_s - (now - first_failure))))
            delay = min(2 * delay, MAX_BACKOFF_S)

    async def _exchange(self, method: str, path: str, body, headers) -> tuple[int, bytes, str | None]:
        async with self._session.request(method, f"{self.url}/{API}/{path}", data=body, headers=headers) as r:
            return r.status, await r.read(), r.headers.get("Retry-After")

    async def _watched(self, exchange):
        """`exchange`, abandoned (asyncio.TimeoutError) when the service's health goes unanswered for HEALTH_GRACE_S
        while its answer is awaited: a slow answer is a wait, a service that has gone silent is a failure."""
        task = asyncio.ensure_future(exchange)
        silent_since = None
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEALTH_EVERY_S)
            if done:
                return task.result()
            if await self._healthy():
                silent_since = None
                continue
            now = time.monotonic()
            silent_since = silent_since if silent_since is not None else now
            if now - silent_since >= HEALTH_GRACE_S:
                task.cancel()
                raise asyncio.TimeoutError(f"its health went unanswered for {HEALTH_GRACE_S:.0f} s during a request")

    async def _healthy(self) -> bool:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with self._session.get(f"{self.url}/{API}/health", headers=headers, timeout=timeout) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    def _wait(self, future: concurrent.futures.Future):
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self.waited_s += time.perf_counter() - start

    def info(self) -> dict:
        import json

        return json.loads(self._wait(self._call(self._request("GET", "info"))))

    def parity(self, input_ids: torch.Tensor) -> tuple[float, float]:
        import json

        from safetensors.torch import save as st_save

        body = st_save({"input_ids": input_ids.to("cpu", torch.int64).contiguous()})
        found = json.loads(self._wait(self._call(self._request("POST", "parity", body))))
        return float(found["max"]), float(found["mean"])

    def submit(self, tokens, k: int, temperature: float) -> concurrent.futures.Future:
        """Send `tokens`' rows (a RolloutTokens) now; the future holds the TeacherTopK of every selected target,
        in row-major order, on the rows' device."""
        body = encode_request(tokens.input_ids, tokens.attention_mask, tokens.targets, k, temperature)
        device = tokens.input_ids.device

        async def ask():
            return decode_answer(await self._request("POST", "score", body), device)[0]

        return self._call(ask())

    def score(self, tokens, options, student_micro_batch: int, pending=None):
        """`scoring.score` against the service: a TeacherTopK per student micro-batch of `tokens`. `pending`:
        futures already submitted for consecutive row blocks of `tokens` (in order); otherwise sent now."""
        import tropd_kernels as tk

        futures = pending or [self.submit(tokens, options.k, options.kernel.temperature)]
        counts = [int(rows.targets.sum()) for rows in tokens.micro_batches(student_micro_batch, trim=False)]
        joined = self.joined(futures, sum(counts))
        return [tk.TeacherTopK(*fields) for fields in zip(*(torch.split(t, counts) for t in joined))]

    def joined(self, futures: list, expected: int, k: int = 0, device=None):
        """The answers of `futures` (submitted for consecutive rows) waited for and joined: a TeacherTopK of every
        target, row-major; `expected` targets, or TeacherRefused. No futures: the TeacherTopK of no targets."""
        import tropd_kernels as tk

        if not futures:
            from .scoring import empty_topk

            answer = empty_topk(k, device)
        else:
            answers = [self._wait(f) for f in futures]
            answer = tk.TeacherTopK(*(torch.cat(f) for f in zip(*answers))) if len(answers) > 1 else answers[0]
        if answer.target_logprob.shape[0] != expected:
            raise TeacherRefused(
                f"the teacher service at {self.url} answered {answer.target_logprob.shape[0]} targets for {expected} "
                "asked"
            )
        return answer


def _reason(data: bytes) -> str:
    import json

    try:
        return str(json.loads(data).get("error", data[:300]))
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")
