"""What the first GPU runs (an H200, 2026-11-30) found, each guarded here on the CPU: cuDNN's attention is
off in a CUDA training process, a non-finite gradient can be traced to the module it reaches first, and a
GPU check whose run skipped a step does not pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tropd_ds import nonfinite, process

ROOT = Path(__file__).resolve().parents[1]


def test_a_cuda_training_process_turns_cudnn_attention_off(monkeypatch):
    """pytorch/pytorch#196678: cuDNN's SDPA backward gives NaN query gradients with a mask at sequence
    lengths 64 mod 128 (step 1 of the GPU check skipped). start_distributed turns it off on CUDA."""
    import deepspeed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(("init", kw["dist_backend"])))
    monkeypatch.setattr(process, "set_collective_timeout", lambda minutes: 1)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        device = process.start_distributed(5.0)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert device == torch.device("cuda", 0) and ("init", "nccl") in calls
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


class _Sqrt(torch.nn.Module):
    def forward(self, x):
        return x.clamp(min=0).sqrt()  # d sqrt / dx at 0 is inf


def test_the_tracer_names_the_first_module_a_non_finite_gradient_reaches(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), _Sqrt(), torch.nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))  # the first of sqrt's inputs is exactly 0
    tracer = nonfinite.Tracer(model, rank=0)
    model(torch.ones(2, 3)).sum().backward()  # outside an update (generation, scoring): the hooks stay silent
    assert capsys.readouterr().out == "" and not torch.is_anomaly_enabled()
    with tracer.watching(7):
        assert torch.is_anomaly_enabled()
        model(torch.ones(2, 3)).sum().backward()
    assert not torch.is_anomaly_enabled()
    out = capsys.readouterr().out
    # backward reaches the Linear after sqrt (finite), then sqrt's output (finite), then the first Linear's
    # output: the first non-finite gradient, inf * 0 -> the NaN / inf the run skipped for
    assert "rank 0 step 7: first non-finite gradient reaches 0 output 0" in out, out
    assert out.count("first non-finite") == 1  # once per backward


def test_the_tracer_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv(nonfinite.ENV, raising=False)
    assert nonfinite.tracer(object(), 0) is None
    monkeypatch.setenv(nonfinite.ENV, "0")
    assert not nonfinite.enabled()
    monkeypatch.setenv(nonfinite.ENV, "1")
    assert nonfinite.enabled()


@pytest.mark.rehearsal  # a short rehearsal of the check's training step: `make rehearse`
def test_a_gpu_check_whose_run_skipped_a_step_fails(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "scripts/gpu_check.py", "--rehearse", "--skip", "env,kernels,bench"]
    env = {**__import__("os").environ, "TROPD_DS_FAULT": "nan_loss@1"}
    proc = subprocess.run(
        cmd + ["--out", str(out), "--work", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    train = result["steps"]["train"]
    assert train["exit"] == 0 and train["summary"]["steps_skipped"] == [1]
    assert train["status"] == "failed: steps [1] skipped for non-finite values"
    assert result["status"] == "failed: train"
