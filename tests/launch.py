"""Running things the way users do: the real `deepspeed` launcher on 2 CPU ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ranks(args: list[str], cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    """`DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ARGS`; fails the test with the tail of the output."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the torch kernel backend on CPU, as in training
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc
