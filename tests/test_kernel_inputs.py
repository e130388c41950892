"""Bad input to tropd_kernels fails with a ValueError naming the argument; backend choice; packaging."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tropd_kernels as tk

ROOT = Path(__file__).resolve().parents[1]


def good():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 2, -100, 49])
    return logits, targets, tk.teacher_topk(logits, targets, 5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, t, te: tk.teacher_topk(x, t, 0), r"k=0: expected an integer in \[1, V=50\]"),
        (lambda x, t, te: tk.teacher_topk(x, t, 51), r"k=51"),
        (lambda x, t, te: tk.teacher_topk(x, t, 2.5), r"k=2.5"),
        (lambda x, t, te: tk.teacher_topk(x, t, 3, temperature=0.0), r"temperature=0.0: expected a finite number > 0"),
        (lambda x, t, te: tk.teacher_topk(x, t, 3, temperature=-1), r"temperature=-1"),
        (lambda x, t, te: tk.teacher_topk(x, t, 3, temperature=float("nan")), r"temperature=nan"),
        (lambda x, t, te: tk.teacher_topk(x[0], t, 3), r"logits has shape \(50,\): expected a 2-D tensor"),
        (lambda x, t, te: tk.teacher_topk(x.long(), t, 3), r"logits.dtype=torch.int64"),
        (lambda x, t, te: tk.teacher_topk(x, t[:3], 3), r"targets has shape \(3,\): expected \[N\] with N=4"),
        (lambda x, t, te: tk.teacher_topk(x, t.float(), 3), r"targets.dtype=torch.float32"),
        (lambda x, t, te: tk.teacher_topk(x, torch.tensor([0, 1, 50, 2]), 3), r"targets contains 50: expected ids in \[0, 50\) or -100"),
        (lambda x, t, te: tk.teacher_topk(x, torch.tensor([0, -1, 5, 2]), 3), r"targets contains -1"),
        (lambda x, t, te: tk.token_terms(x, t, te, fkl_mode="jsd"), r"fkl_mode='jsd': expected one of paper, tail, renorm"),
        (lambda x, t, te: tk.token_terms(x, t, te, logprob_floor=3.0), r"logprob_floor=3.0"),
        (lambda x, t, te: tk.token_terms(x, t, te, fkl_cover=0.0), r"fkl_cover=0.0: expected None or a number in \(0, 1\]"),
        (lambda x, t, te: tk.token_terms(x, t, te, fkl_cover=1.5), r"fkl_cover=1.5"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(ids=te.ids[:2])), r"teacher.ids has shape \(2, 5\)"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(ids=te.ids.int())), r"teacher.ids.dtype=torch.int32"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(logprobs=te.logprobs[:, :3])), r"teacher.logprobs has shape"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(logprobs=te.logprobs.half())), r"teacher.logprobs.dtype"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(entropy=te.entropy[:1])), r"teacher.entropy has shape"),
        (
            lambda x, t, te: tk.token_terms(x[:, :40], t.clamp(max=39), te._replace(ids=te.ids * 0 + torch.arange(36, 41))),
            r"teacher.ids holds ids outside \[0, 40\)",
        ),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(ids=te.ids[:, [0, 0, 1, 2, 3]])), r"repeats an id"),
        (lambda x, t, te: tk.token_terms(x, t, tuple(te)), r"teacher is a tuple: expected a TeacherTopK"),
        (lambda x, t, te: tk.token_terms(x, t, te, backend="cuda"), r"backend='cuda'.*expected one of triton, torch"),
        (lambda x, t, te: tk.teacher_topk_from_hidden(x[:, :8], x, t, 3), r"weight has shape \(4, 50\): expected \[V, d\] with d=8"),
        (lambda x, t, te: tk.teacher_topk_from_hidden(x[:, :8], x[:, :8], t, 3, bias=torch.zeros(3)), r"bias has shape \(3,\)"),
        (lambda x, t, te: tk.teacher_topk_from_hidden(x[:, :8], torch.randn(50, 8), t, 3, chunk_size=0), r"chunk_size=0"),
    ],
)
def test_bad_input_names_argument_and_accepted_values(call, match):
    logits, targets, teacher = good()
    with pytest.raises(ValueError, match=match):
        call(logits, targets, teacher)


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
    installed = subprocess.run([sys.executable, "-m", "pip", "show", "kernels"], capture_output=True, text=True).returncode == 0
    assert hf_available == str(installed)
