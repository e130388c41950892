"""Shared cases for the kernel tests: logits with masked (-inf) columns, ignored rows, a peaked row; the
oracle comparisons in fp32 and bf16 (test_kernel_teacher_topk.py, test_kernel_token_terms.py)."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
NEG_INF = float("-inf")


def make_case(n: int, vocab: int, seed: int, dtype=torch.float32):
    """Teacher and student logits sharing masked (-inf) vocabulary columns, some ignored rows,
    one sharply peaked row (entropy near 0) and a row where the target is among the teacher's top ids."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=g) * 3
    student = torch.randn(n, vocab, generator=g) * 2 + 0.3 * teacher
    masked = torch.randperm(vocab, generator=g)[: max(1, vocab // 20)]
    teacher[:, masked] = NEG_INF
    student[:, masked] = NEG_INF
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[masked] = False
    choices = allowed.nonzero().squeeze(1)
    targets = choices[torch.randint(len(choices), (n,), generator=g)]
    if n > 2:
        targets[1] = -100
        targets[n - 1] = -100
        student[2] *= 20  # peaked row
        targets[0] = int(teacher[0].argmax())
    return teacher.to(dtype).to(DEVICE), student.to(dtype).to(DEVICE), targets.to(DEVICE)


def tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-5)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, operand_error: torch.Tensor | None = None) -> None:
    """fp32 gradients within 1e-5 relative. A bf16 gradient must be a once-rounded fp32 gradient that
    agrees with the oracle: within half a bf16 ulp (2^-8 relative at worst, more than 2e-3) of a value
    within 1e-5 relative of the oracle's. `operand_error` adds the bound of a product whose fp32 operand was
    rounded to bf16 first (CUDA's tensor-core path: `operand_rounding_bound`)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    exponent = torch.floor(torch.log2(want.abs().clamp(min=1e-30)))
    half_ulp = torch.exp2(exponent - 8)
    err = (got.float() - want).abs()
    bad = err > half_ulp + 1e-5 * want.abs() + 1e-6 + (0 if operand_error is None else operand_error)
    if bad.any():
        i = int(err.flatten().argmax())
        raise AssertionError(
            f"{int(bad.sum())} bf16 gradient entries off by more than half an ulp; worst at flat index {i}: "
            f"got {got.flatten()[i].item()}, oracle {want.flatten()[i].item()}"
        )


def operand_rounding_bound(sum_of_squared_products: torch.Tensor) -> torch.Tensor:
    """How far a product sum_i a_i b_i can move when each a_i is rounded to bf16 first (CUDA's tensor-core
    path), given sum_i (a_i b_i)^2: the rounding errors are independent, each uniform within 2^-8 of a_i, so
    their sum has a standard deviation of 2^-8 / sqrt(3) times sqrt(sum (a_i b_i)^2); 6 of those. The
    worst case, 2^-8 sum |a_i b_i|, is ~sqrt(K) times larger and would let a 10% error through."""
    return 6 * 2.0**-8 / 3**0.5 * sum_of_squared_products.sqrt()


SHAPES = [  # (N, V, k, temperature)
    (1, 1000, 1, 1.0),
    (37, 3001, 16, 0.7),
    (37, 1000, 64, 1.3),
]
OPTIONS = [(None, None), (-6.0, None), (None, 0.9), (-6.0, 0.6)]  # (logprob_floor, fkl_cover)


PROJECTED = dict(n=37, d=24, vocab=1000, k=16, temp=0.9)  # the _from_hidden case shared by both op test files


def projected_case(dtype, with_bias: bool) -> dict:
    """Student and teacher hidden states, an lm_head weight (and bias), targets with two ignored rows."""
    n, d, vocab = PROJECTED["n"], PROJECTED["d"], PROJECTED["vocab"]
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(n, d, generator=g)).to(dtype).to(DEVICE)
    weight = (torch.randn(vocab, d, generator=g) * 0.5).to(dtype).to(DEVICE)
    bias = (torch.randn(vocab, generator=g)).to(dtype).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    targets[[3, 20]] = -100
    t_hidden = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, t_hidden=t_hidden)


def projected_logits(h, w, b):
    """The oracle's logits: h W^T (+ b) in fp32."""
    out = h.float() @ w.float().t()
    return out if b is None else out + b.float()
