"""Running things the way users do: the real `deepspeed` launcher on 2 CPU ranks."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(port: int, nproc: int = 2, cli: bool = False) -> list[str]:
    """DeepSpeed's launcher for `nproc` local ranks. With `cli`, the `deepspeed` command itself; otherwise
    the per-node launcher that command starts (`python -m deepspeed.launcher.launch`, with the world the
    command would encode for one node): the same ranks, environment and signal handling, without the
    command's own process, which re-imports DeepSpeed only to start it (4 s of a 16 s launch here). The demo
    test and the reference run (conftest's `full_run`) use the command, as users do."""
    if cli:
        return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port)]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.launch",
        f"--world_info={world}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]


def cpu_ranks(args: list[str], cwd, timeout: int = 900, cli: bool = False) -> subprocess.CompletedProcess:
    """`DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ARGS` (see `launcher`); fails the test with the tail of the
    output."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the torch kernel backend on CPU, as in training
    port = free_port()
    cmd = [*launcher(port, cli=cli), *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    finally:
        release_shm(port)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def release_shm(port: int) -> None:
    """DeepSpeed's CPU all-reduce buffers of every rank of a finished launch (the trainer unlinks its
    own at exit; test workers and killed ranks do not): 66 MiB of /dev/shm each."""
    from tropd_ds.process import release_cpu_shm_buffers

    release_cpu_shm_buffers(str(port), "*")


# ----------------------------------------------------------------------------- trainer runs on tiny models


def run_config(root: Path, outputs: Path) -> dict:
    """The tests' run config: the tiny models and data under `root`, every output folder under `outputs`."""
    return {
        "student": {
            "path": str(root / "student"),
            "ds_config": str(ROOT / "ds_configs/cpu_student_zero3.json"),
            "micro_batch_size": 2,
        },
        "teacher": {
            "path": str(root / "teacher"),
            "ds_config": str(ROOT / "ds_configs/cpu_teacher_zero3_offload.json"),
            "micro_batch_size": 4,
        },
        "data": {
            "path": str(root / "data/train.jsonl"),
            "eval_path": str(root / "data/eval.jsonl"),
            "max_prompt_tokens": 32,
        },
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 12, "guidance": True},
        "objective": {"name": "tropd", "options": {"k": 8}},
        # a decaying schedule (cosine to 10%): a resume that lost the scheduler's state shows in `lr`
        "optim": {"steps": 6, "lr": 1e-3, "min_lr_ratio": 0.1},
        "checkpoint": {
            "dir": str(outputs / "ckpt"),
            "every": 3,
            "keep_last": 2,
            "export_dir": str(outputs / "export"),
        },
        "logging": {"dir": str(outputs / "logs"), "samples_every": 2, "progress": True},
        "eval": {"max_prompts": 8, "max_new_tokens": 12},
    }


def write_config(root: Path, name: str, **sections) -> Path:
    cfg = run_config(root, root / name)
    for section, values in sections.items():
        cfg[section].update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, *overrides: str, cli: bool = False) -> subprocess.CompletedProcess:
    args = ["--module", "tropd_ds.train", "--config", config]
    for o in overrides:
        args += ["--set", o]
    return cpu_ranks(args, cwd=config.parent, cli=cli)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
