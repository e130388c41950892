"""The GPU check's parts that can be checked without a GPU: its run config passes every check the
trainer makes before its engines (bf16 DeepSpeed configs included), and it refuses to run on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_gpu_run_config_passes_the_trainer_checks(tmp_path):
    import gpu_check

    from tropd_ds.config import load_config
    from tropd_ds.preflight import validate_before_engines

    cfg = load_config(gpu_check.run_config(tmp_path, 12))
    assert cfg.student.dtype == cfg.teacher.dtype == "bfloat16" and cfg.optim.steps == 12
    validate_before_engines(cfg, world=1)


def test_gpu_check_runs_the_kernel_test_files_that_exist():
    import gpu_check

    assert all((ROOT / path).is_file() for path in gpu_check.KERNEL_TESTS)


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gpu_check.py"), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
