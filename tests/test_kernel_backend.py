"""Which backend runs (argument, TROPD_KERNELS_BACKEND, device), and the package's import name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tropd_kernels as tk

ROOT = Path(__file__).resolve().parents[1]


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("TROPD_KERNELS_BACKEND", "torch")
    assert tk.resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("TROPD_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.resolve_backend(None, torch.device("cpu")) == "triton"
    monkeypatch.setenv("TROPD_KERNELS_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"backend='tpu'"):
        tk.resolve_backend(None, torch.device("cpu"))


def test_default_backend_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TROPD_KERNELS_BACKEND", raising=False)
    assert tk.resolve_backend(None, torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on cpu tensors.*TRITON_INTERPRET=1"):
        tk.resolve_backend("triton", torch.device("cpu"))


def test_nothing_is_importable_as_kernels_from_the_repository_root():
    """HF's `kernels` package is probed by transformers; ours must not answer to that name."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "ours = spec is not None and spec.origin is not None\n"
        "if spec is not None:\n"
        "    import kernels\n"
        "    ours = ours or hasattr(kernels, 'teacher_topk') or hasattr(kernels, 'tropd_kernels')\n"
        "from transformers.utils import is_kernels_available\n"
        "import tropd_kernels\n"
        "print(ours, is_kernels_available(), tropd_kernels.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    ours, hf_available, name = out.stdout.split()
    assert ours == "False" and name == "tropd_kernels"
    # transformers would only see HF's package if it were installed, never our folder
    installed = (
        subprocess.run([sys.executable, "-m", "pip", "show", "kernels"], capture_output=True, text=True).returncode == 0
    )
    assert hf_available == str(installed)
