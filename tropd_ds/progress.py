"""Rank 0's progress through the steps: a tqdm bar on a terminal; in a file (a batch job's log, `> run.log`)
one plain line per reported step instead of a bar's carriage-return redraws, which make a log one line of
tens of kilobytes."""

from __future__ import annotations

import sys
import time


class StepProgress:
    """update(record) after each step, close() at the end (twice is harmless). Not a terminal: a line every
    `every` steps (default: about 20 lines a run), the first and the last step always, with the step time
    and the time left at the current pace."""

    def __init__(self, total: int, initial: int, stream=None, every: int | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.start_step = total, initial, initial
        self.t0 = time.monotonic()
        self.bar = None
        self.closed = False
        if _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="distill", unit="step", dynamic_ncols=True, file=self.stream
            )
        else:  # the libraries' own bars (transformers' "Writing model shards" in the export) go quiet too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        self.every = every if every is not None else max(1, (total - initial) // 20)

    def update(self, record: dict) -> None:
        self.done += 1
        loss, trust = record.get("loss", float("nan")), record.get("trust_fraction", float("nan"))
        tok_s = record.get("tokens_per_s", float("nan"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", trust=f"{trust:.2f}", tok_s=f"{tok_s:.0f}")
            self.bar.update(1)
            return
        ran = self.done - self.start_step
        if ran % self.every and self.done not in (self.start_step + 1, self.total):
            return
        per_step = (time.monotonic() - self.t0) / ran
        left = per_step * (self.total - self.done)
        print(
            f"[tropd-ds] step {self.done}/{self.total} ({100 * self.done / self.total:.0f}%): loss {loss:.4f}, trust "
            f"{trust:.2f}, {tok_s:.0f} tokens/s; {per_step:.2f} s/step, about {_duration(left)} left",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None and not self.closed:
            self.bar.close()
        self.closed = True


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
