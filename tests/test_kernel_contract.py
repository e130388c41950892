"""The kernel contract: bad input to tropd_kernels fails with a ValueError naming the argument and what is
accepted, in the ops and in KernelOptions."""

from __future__ import annotations

import pytest
import torch
import tropd_kernels as tk


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
        (
            lambda x, t, te: tk.teacher_topk(x, torch.tensor([0, 1, 50, 2]), 3),
            r"targets contains 50: expected ids in \[0, 50\) or -100",
        ),
        (lambda x, t, te: tk.teacher_topk(x, torch.tensor([0, -1, 5, 2]), 3), r"targets contains -1"),
        (
            lambda x, t, te: tk.token_terms(x, t, te, fkl_mode="jsd"),
            r"fkl_mode='jsd': expected one of paper, tail, renorm",
        ),
        (lambda x, t, te: tk.token_terms(x, t, te, logprob_floor=3.0), r"logprob_floor=3.0"),
        (
            lambda x, t, te: tk.token_terms(x, t, te, fkl_cover=0.0),
            r"fkl_cover=0.0: expected None or a number in \(0, 1\]",
        ),
        (lambda x, t, te: tk.token_terms(x, t, te, fkl_cover=1.5), r"fkl_cover=1.5"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(ids=te.ids[:2])), r"teacher.ids has shape \(2, 5\)"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(ids=te.ids.int())), r"teacher.ids.dtype=torch.int32"),
        (
            lambda x, t, te: tk.token_terms(x, t, te._replace(logprobs=te.logprobs[:, :3])),
            r"teacher.logprobs has shape",
        ),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(logprobs=te.logprobs.half())), r"teacher.logprobs.dtype"),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(entropy=te.entropy[:1])), r"teacher.entropy has shape"),
        (
            lambda x, t, te: tk.token_terms(
                x[:, :40], t.clamp(max=39), te._replace(ids=te.ids * 0 + torch.arange(36, 41))
            ),
            r"teacher.ids holds ids outside \[0, 40\)",
        ),
        (lambda x, t, te: tk.token_terms(x, t, te._replace(ids=te.ids[:, [0, 0, 1, 2, 3]])), r"repeats an id"),
        (lambda x, t, te: tk.token_terms(x, t, tuple(te)), r"teacher is a tuple: expected a TeacherTopK"),
        (lambda x, t, te: tk.token_terms(x, t, te, backend="cuda"), r"backend='cuda'.*expected one of triton, torch"),
        (
            lambda x, t, te: tk.teacher_topk_from_hidden(x[:, :8], x, t, 3),
            r"weight has shape \(4, 50\): expected \[V, d\] with d=8",
        ),
        (
            lambda x, t, te: tk.teacher_topk_from_hidden(x[:, :8], x[:, :8], t, 3, bias=torch.zeros(3)),
            r"bias has shape \(3,\)",
        ),
        (
            lambda x, t, te: tk.teacher_topk_from_hidden(x[:, :8], torch.randn(50, 8), t, 3, chunk_size=0),
            r"chunk_size=0",
        ),
    ],
)
def test_bad_input_names_argument_and_accepted_values(call, match):
    logits, targets, teacher = good()
    with pytest.raises(ValueError, match=match):
        call(logits, targets, teacher)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), r"temperature=0.0: expected a finite number > 0"),
        (dict(fkl_mode="full"), r"fkl_mode='full': expected one of paper, tail, renorm"),
        (dict(logprob_floor=float("nan")), r"logprob_floor=nan: expected None or a number <= 0"),
        (dict(fkl_cover=True), r"fkl_cover=True: expected None or a number in \(0, 1\]"),
    ],
)
def test_kernel_options_are_checked_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tk.KernelOptions(**kwargs)


def test_options_and_separate_arguments_are_one_or_the_other():
    logits, targets, teacher = good()
    with pytest.raises(ValueError, match=r"pass either options=KernelOptions\(...\) or temperature"):
        tk.token_terms(logits, targets, teacher, 0.5, options=tk.KernelOptions(0.5))
    with pytest.raises(ValueError, match=r"options is a dict: expected a tropd_kernels.KernelOptions"):
        tk.token_terms(logits, targets, teacher, options={"temperature": 0.5})
