"""Fault injection for the reliability tests, off unless TROPD_DS_FAULT is set.

TROPD_DS_FAULT is a comma-separated list of KIND@STEP[:rRANK]:
  nan_loss@3          the loss of step 3 (1-based, as logged) is NaN on every rank
  crash_in_save@4:r1  rank 1 dies (os._exit) after writing its part of step 4's checkpoint
  disk_full_in_save@4 saving step 4's checkpoint raises ENOSPC on every rank, after DeepSpeed's part
  disk_full_in_deepspeed_save@4:r0
                      rank 0's first file write inside DeepSpeed's save_checkpoint raises ENOSPC
                      (the other ranks go on to DeepSpeed's closing barrier)
  disk_full_in_metrics@2
                      writing step 2's record (metrics.jsonl, the monitors) raises ENOSPC on rank 0
  stall@2:r1          rank 1 sleeps TROPD_DS_STALL_S seconds (default 60) before step 2's rollout, or
                      until a signal reaches it; stall@<optim.steps + 1> holds it before the final evaluation
"""

from __future__ import annotations

import errno
import os


def _parse() -> list[tuple[str, int, int | None]]:
    spec = os.environ.get("TROPD_DS_FAULT", "")
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, _, rest = item.partition("@")
        step, _, rank = rest.partition(":r")
        out.append((kind, int(step), int(rank) if rank else None))
    return out


def active(kind: str, step: int, rank: int) -> bool:
    return any(k == kind and s == step and (r is None or r == rank) for k, s, r in _parse())


def in_save(step: int, rank: int) -> None:
    if active("crash_in_save", step, rank):
        os._exit(17)
    if active("disk_full_in_save", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(injected by TROPD_DS_FAULT)")


def in_metrics(step: int, rank: int) -> None:
    """disk_full_in_metrics@N: writing step N's record (metrics.jsonl and the monitors) raises ENOSPC."""
    if active("disk_full_in_metrics", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.jsonl (injected by TROPD_DS_FAULT)")


def inject_into_deepspeed_save(engine, step: int, rank: int) -> None:
    """Make the engine's checkpoint writer raise ENOSPC for this save, if asked."""
    if not active("disk_full_in_deepspeed_save", step, rank):
        return

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(injected by TROPD_DS_FAULT inside DeepSpeed)")

    engine.checkpoint_engine.save = full


def stall(step: int, rank: int, interrupted=lambda: False) -> None:
    """Hold this rank for TROPD_DS_STALL_S seconds, or until `interrupted()` (a signal arrived)."""
    if active("stall", step, rank):
        import time

        end = time.monotonic() + float(os.environ.get("TROPD_DS_STALL_S", "60"))
        while time.monotonic() < end and not interrupted():
            time.sleep(0.05)
