"""Per-step metrics: reduced across micro-batches and ranks, written to a JSONL file and to
DeepSpeed's monitor (TensorBoard / CSV / W&B as its config enables)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from . import collectives, faults


def mean_over(dicts: list[dict]) -> dict:
    """Key-wise mean (a micro-batch without sampled tokens lacks some keys). A non-finite value
    makes the mean non-finite: a NaN loss is logged as NaN, not hidden."""
    keys = sorted({k for d in dicts for k in d})
    out = {}
    for k in keys:
        vals = [d[k] for d in dicts if k in d and isinstance(d[k], (int, float))]
        if vals:
            out[k] = math.fsum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else sum(vals) / len(vals)
    return out


def reduce_across_ranks(local: list[dict]) -> dict:
    return mean_over([d for part in collectives.all_gather_object(local) for d in part])


class MetricsWriter:
    def __init__(self, log_dir: str, rank: int, monitor=None):
        self.rank = rank
        self.monitor = monitor
        self.path = Path(log_dir) / "metrics.jsonl"
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records that a killed run wrote after its last checkpoint."""
        if self.rank != 0 or not self.path.exists():
            return
        kept, dropped = [], []
        for line in self.path.read_text().splitlines():
            if not line:
                continue
            try:
                (kept if json.loads(line).get("step", -1) <= step else dropped).append(line)
            except ValueError:  # a line cut short by the kill
                dropped.append(line)
        if dropped:  # kept aside, not lost: the resumed run writes these steps again
            with self.path.with_name(self.path.stem + ".rolled_back.jsonl").open("a") as f:
                f.write("".join(line + "\n" for line in dropped))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def describe_run(self, step: int, run: dict) -> None:
        """The run's resolved config and code version, for the trackers: W&B's run config, a TensorBoard text
        entry (metrics.jsonl has them in the first step's record)."""
        if self.rank != 0 or self.monitor is None or not getattr(self.monitor, "enabled", False):
            return
        tb = getattr(self.monitor, "tb_monitor", None)
        if tb is not None and getattr(tb, "summary_writer", None) is not None:
            tb.summary_writer.add_text("tropd/run", "```\n" + json.dumps(run, indent=2, default=str) + "\n```", step)
            tb.summary_writer.flush()
        if getattr(self.monitor, "wandb_monitor", None) is not None:
            import wandb

            if wandb.run is not None:
                wandb.config.update(json.loads(json.dumps(run, default=str)), allow_val_change=True)

    def write(self, step: int, record: dict) -> None:
        if self.rank != 0:
            return
        faults.in_metrics(step, self.rank)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            self.monitor.write_events(
                [(f"tropd/{k}", v, step) for k, v in record.items() if isinstance(v, (int, float))]
            )


def code_version() -> dict:
    """The code a run ran: the git commit of the tropd-ds checkout (None when installed without git), whether
    it had uncommitted changes, and the versions of the packages that decide the numbers."""
    import deepspeed
    import torch
    import transformers

    from . import __version__

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # only a tropd-ds checkout (an editable install) has a commit of its own: an installed copy lives in
    # site-packages, where git would answer for whatever repository holds the environment
    commit = git("rev-parse", "HEAD") if (root / "setup.py").is_file() else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "versions": {
            "tropd_ds": __version__,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
    }


def step_record(local: list[dict], engine, extra: dict) -> dict:
    """A step's record: the micro-batch metrics of every rank reduced, then the engine's gradient norm and
    learning rate, then `extra` (this rank's timings and counters) as they are."""
    record = reduce_across_ranks(local)
    grad_norm = engine.get_global_grad_norm()
    record.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), lr=engine.get_lr()[0])
    record.update(extra)
    return record


class NonFiniteSteps:
    """Consecutive steps that DeepSpeed skipped for a non-finite gradient norm (the parameters stay as they
    were): each is marked in its record; `limit` of them in a row end the run."""

    def __init__(self, limit: int):
        self.limit, self.steps = limit, []

    def observe(self, step: int, record: dict, skipped: bool) -> str | None:
        """Marks `record`; returns a line to log when the step was skipped."""
        if not skipped:
            self.steps.clear()
            return None
        bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v) and k != "grad_norm")
        bad = bad or ["gradient"]
        self.steps.append(step)
        record.update(skipped=True, non_finite=bad)
        return (
            f"step {step} skipped: non-finite {', '.join(bad)} (grad norm {record['grad_norm']}); parameters unchanged"
        )

    def exhausted(self, checkpoint_dir: str) -> str | None:
        """The error that ends the run, once `limit` steps in a row were skipped."""
        if len(self.steps) < self.limit:
            return None
        first, last = self.steps[0], self.steps[-1]
        return (
            f"error: {len(self.steps)} consecutive steps with non-finite values (steps {first}-{last}; "
            f"optim.max_bad_steps={self.limit}). Parameters are as after step {first - 1}; the newest checkpoint is "
            f"in {checkpoint_dir}. Check the teacher and the data, lower optim.lr, or raise optim.max_bad_steps."
        )
