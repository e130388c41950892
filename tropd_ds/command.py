"""The command line of a training run (`tropd-ds train`, `deepspeed ... -m tropd_ds.train`): arguments,
the run config, and the pre-flight checks, or the dry run."""

from __future__ import annotations

import argparse
import os
import sys

from . import checkpoint
from .config import ConfigError, RunConfig, load_config
from .preflight import Prepared, validate_before_engines

DESCRIPTION = """The distillation run: `deepspeed [--num_gpus N] -m tropd_ds.train --config run.yaml [--set k=v ...]`.

Each step is the algorithm's three phases: rollout (the student samples, after a teacher prefix when
guided), teacher scoring (a TeacherTopK per response token), student update (kernels, objective,
backward, step). Around them, on schedule: metrics, held-out evaluation, checkpoints.
"""


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[tropd-ds] {msg}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="tropd-ds train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config field with its type, default, range and meaning: tropd-ds config --list. The resolved "
        "config of a run: tropd-ds config --dump --config run.yaml [--set k=v ...].",
    )
    ap.add_argument("--config", required=False, help="YAML or JSON run config")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set objective.name=opd (repeatable)",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="check the config on the meta device (no weights, no engines) and exit"
    )
    ap.add_argument(
        "--world-size", type=int, default=None, help="ranks the dry run plans for (default: WORLD_SIZE, or 1)"
    )
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU for the dry run's memory plan")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    ap.add_argument("--local_rank", "--local-rank", type=int, default=local_rank, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def prepare(argv=None) -> tuple[RunConfig, Prepared] | int:
    """The checked config and what the checks loaded; or an exit code: 0 after a dry run, 2 after an error
    in the configuration (printed)."""
    args = parse_args(argv)
    try:
        if args.config is None and not args.overrides:
            raise ConfigError(
                "no --config given: pass a run config (configs/demo.yaml is one; `tropd-ds config --list` lists every "
                "field), or give every setting with --set"
            )
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from .dry_run import dry_run

            world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
            if world < 1:
                raise ConfigError(f"--world-size={world}: expected an integer >= 1")
            for line in dry_run(cfg, world, args.gpu_mem):
                print(line, flush=True)
            return 0
        prepared = validate_before_engines(cfg)
        # the checkpoint folder is this run's, not locked by another, and every output folder is writable
        checkpoint.claim(cfg, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), _log)
        return cfg, prepared
    except ConfigError as exc:
        print(f"tropd-ds: configuration error: {exc}", file=sys.stderr)
        return 2
