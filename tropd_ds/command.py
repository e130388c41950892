"""The command line of a training run (`tropd-ds train`, `deepspeed ... -m tropd_ds.train`): arguments,
the run config, and the pre-flight checks, or the dry run."""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import ownership, process
from .config import ConfigError, RunConfig, load_config
from .preflight import Prepared, validate_before_engines

DESCRIPTION = """The distillation run: `deepspeed [--num_gpus N] -m tropd_ds.train --config run.yaml [--set k=v ...]`.

Each step is the algorithm's three phases: rollout (the student samples, after a teacher prefix when
guided), teacher scoring (a TeacherTopK per response token), student update (kernels, objective,
backward, step). Around them, on schedule: metrics, held-out evaluation, checkpoints.
"""


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
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU for the dry run's memory plan (80)")
    ap.add_argument("--local_rank", "--local-rank", type=str, default=None, help=argparse.SUPPRESS)  # the launcher's
    args = ap.parse_args(argv)
    args.gpu_mem_given = args.gpu_mem is not None
    if args.gpu_mem is None:
        args.gpu_mem = 80.0
    return args


def launch_environment() -> tuple[int, int]:
    """WORLD_SIZE and RANK as the launcher set them (1 and 0 without one), checked."""
    values = {}
    for name, default, low in (("WORLD_SIZE", "1", 1), ("RANK", "0", 0), ("LOCAL_RANK", "0", 0)):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            values[name] = None
        if values[name] is None or values[name] < low:
            raise ConfigError(
                f"the environment variable {name}={text!r}: expected an integer >= {low} (a launcher sets it; unset it "
                "to run one process)"
            )
    if values["RANK"] >= values["WORLD_SIZE"]:
        raise ConfigError(f"RANK={values['RANK']} with WORLD_SIZE={values['WORLD_SIZE']}: expected RANK < WORLD_SIZE")
    return values["WORLD_SIZE"], values["RANK"]


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
        world, rank = launch_environment()
        if not args.dry_run and (args.world_size is not None or args.gpu_mem_given):
            flag = "--world-size" if args.world_size is not None else "--gpu-mem"
            raise ConfigError(f"{flag} applies to --dry-run only: a run takes its ranks from the launcher")
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from .dry_run import dry_run

            world = args.world_size if args.world_size is not None else world
            if world < 1:
                raise ConfigError(f"--world-size={world}: expected an integer >= 1")
            if not math.isfinite(args.gpu_mem) or args.gpu_mem <= 0:
                raise ConfigError(f"--gpu-mem={args.gpu_mem}: expected GiB per GPU, a number > 0")
            for line in dry_run(cfg, world, args.gpu_mem):
                print(line, flush=True)
            return process.ExitCode.OK
        prepared = validate_before_engines(cfg, world)
        # the checkpoint folder is this run's, not locked by another, and every output folder is writable
        ownership.claim(cfg, world, rank, process.log)
        return cfg, prepared
    except ConfigError as exc:
        print(f"tropd-ds: configuration error: {exc}", file=sys.stderr)
        return process.ExitCode.CONFIG
