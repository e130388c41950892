"""Every launcher starts the same training: `torchrun` and `accelerate launch` (its torchrun path,
--multi_gpu, which runs on CPU ranks too) reproduce the `deepspeed` launcher's steps exactly on 2 CPU
ranks; a world size the config cannot divide is refused before any engine starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port, records, release_shm, write_config

BIN = Path(sys.executable).parent


def command(launcher: str, nproc: int, port: int) -> list[str]:
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port)]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]  # fmt: skip


def run(launcher: str, config: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    port = free_port()
    cmd = command(launcher, nproc, port) + ["-m", "tropd_ds.train", "--config", str(config)]
    try:
        return subprocess.run(cmd, env=env, cwd=config.parent, capture_output=True, text=True, timeout=600)
    finally:
        release_shm(port)


@pytest.mark.launches
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_a_launcher_starts_the_same_training_as_deepspeed(workspace, full_run, launcher):
    # the full run's 6 steps (the guidance schedule depends on them), stopped after 2 with a checkpoint
    config = write_config(workspace, f"by_{launcher}", checkpoint={"every": 0, "stop_after": 2})
    proc = run(launcher, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 ranks;" in proc.stdout
    ours = {r["step"]: r for r in records(workspace / f"by_{launcher}") if "loss" in r}
    theirs = {r["step"]: r for r in records(full_run[0]) if "loss" in r}  # the deepspeed launcher, same seed and data
    assert sorted(ours) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "grad_norm", "trust_fraction", "response_len", "lr"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-6, abs=1e-9), (launcher, step, key)
    assert "stopping after step 2" in proc.stdout and (workspace / f"by_{launcher}/ckpt/step2").is_dir()


def test_a_world_size_the_batch_cannot_divide_is_refused_before_any_engine(workspace):
    config = write_config(workspace, "by_three", optim={"steps": 2, "lr": 1e-3})
    proc = run("torchrun", config, nproc=3)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rollout.prompts_per_step=4: expected a multiple of the 3 ranks" in out, out[-3000:]
    # torchrun reports the failed ranks with a traceback of its own; none of ours
    assert not any(line.strip().startswith("File") and "tropd_ds" in line for line in out.splitlines()), out[-3000:]
    assert not (workspace / "by_three/ckpt").exists()


@pytest.mark.parametrize(
    "local,visible,index",
    [(0, 8, 0), (5, 8, 5), (3, 1, 0), (7, 1, 0)],
    ids=["first", "eight-visible", "one-visible", "one-visible-last"],
)
def test_the_device_is_the_local_rank_modulo_the_visible_gpus(local, visible, index):
    """One visible GPU per process (Slurm's per-task binding): every rank uses device 0, and LOCAL_RANK, which
    DeepSpeed's engine and zero.Init take as the device index, becomes that index (and mpirun's local rank,
    which DeepSpeed asserts equal to it)."""
    from tropd_ds.process import assign_device

    env = {"LOCAL_RANK": str(local), "RANK": "9", "OMPI_COMM_WORLD_LOCAL_RANK": str(local)}
    assert assign_device(env, visible) == index
    assert env["LOCAL_RANK"] == str(index) == env["OMPI_COMM_WORLD_LOCAL_RANK"]
    assert env.get("TROPD_DS_LAUNCHER_LOCAL_RANK", str(local)) == str(local)


def test_two_ranks_on_one_gpu_and_an_mpi_launch_without_ranks_are_refused():
    from tropd_ds.config import ConfigError
    from tropd_ds.process import assign_device, check_not_launched_by_mpi

    with pytest.raises(ConfigError, match="LOCAL_RANK=5 but this process sees 4 GPUs"):
        assign_device({"LOCAL_RANK": "5"}, 4)  # NCCL would refuse it later as "Duplicate GPU detected"
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE=4 but RANK and WORLD_SIZE are not set"):
        check_not_launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"})
    check_not_launched_by_mpi({"SLURM_STEP_NUM_TASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"})  # one process: fine
