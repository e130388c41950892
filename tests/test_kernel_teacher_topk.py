"""tropd_kernels.teacher_topk (and its _from_hidden variant) against the naive full-softmax oracle."""

from __future__ import annotations

import pytest
import torch
import tropd_kernels as tk
from kernel_cases import BACKENDS, DEVICE, SHAPES, make_case, tolerances


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-V{}-k{}-T{}".format(*s))
def test_teacher_topk_matches_oracle(backend, dtype, shape):
    n, vocab, k, temp = shape
    teacher, _, targets = make_case(n, vocab, seed=n + vocab + k, dtype=dtype)
    got = tk.teacher_topk(teacher, targets, k, temp, backend=backend)
    want = tk.teacher_topk_oracle(teacher, targets, k, temp)
    assert torch.equal(got.ids, want.ids)
    for name in ("logprobs", "target_logprob", "entropy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tolerances(torch.float32), msg=name)
        assert getattr(got, name).dtype == torch.float32
    ignored = targets == -100
    assert torch.all(got.ids[ignored] == 0) and torch.all(got.logprobs[ignored] == 0)
    assert torch.all(got.entropy[ignored] == 0) and torch.all(got.target_logprob[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_teacher_topk_from_hidden_matches_oracle_on_projected_logits(backend, dtype, with_bias):
    n, d, vocab, k, temp = 37, 24, 1000, 16, 0.9
    g = torch.Generator().manual_seed(2)
    torch.randn(n, d, generator=g)  # the student's hidden states in test_kernel_token_terms.py: the same case
    weight = (torch.randn(vocab, d, generator=g) * 0.5).to(dtype).to(DEVICE)
    bias = (torch.randn(vocab, generator=g)).to(dtype).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    targets[[3, 20]] = -100
    t_hidden = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)

    def logits_of(h, w, b):
        out = h.float() @ w.float().t()
        return out if b is None else out + b.float()

    teacher = tk.teacher_topk_from_hidden(t_hidden, weight, targets, k, temp, bias, chunk_size=8, backend=backend)
    teacher_ref = tk.teacher_topk_oracle(logits_of(t_hidden, weight, bias), targets, k, temp)
    assert torch.equal(teacher.ids, teacher_ref.ids)
    for name in ("logprobs", "target_logprob", "entropy"):
        torch.testing.assert_close(getattr(teacher, name), getattr(teacher_ref, name), rtol=1e-5, atol=1e-5)
