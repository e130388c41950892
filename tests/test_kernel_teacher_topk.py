"""tropd_kernels.teacher_topk (and its _from_hidden variant) against the naive full-softmax oracle."""

from __future__ import annotations

import pytest
import torch
import tropd_kernels as tk
from kernel_cases import BACKENDS, PROJECTED, SHAPES, make_case, projected_case, projected_logits, tolerances


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
    k, temp = PROJECTED["k"], PROJECTED["temp"]
    c = projected_case(dtype, with_bias)
    weight, bias, targets, t_hidden = c["weight"], c["bias"], c["targets"], c["t_hidden"]
    teacher = tk.teacher_topk_from_hidden(t_hidden, weight, targets, k, temp, bias, chunk_size=8, backend=backend)
    teacher_ref = tk.teacher_topk_oracle(projected_logits(t_hidden, weight, bias), targets, k, temp)
    assert torch.equal(teacher.ids, teacher_ref.ids)
    for name in ("logprobs", "target_logprob", "entropy"):
        torch.testing.assert_close(getattr(teacher, name), getattr(teacher_ref, name), rtol=1e-5, atol=1e-5)
