"""tropd_kernels against the naive full-softmax oracle: values, gradients, odd shapes, bf16, -inf."""

from __future__ import annotations

import pytest
import torch
import tropd_kernels as tk

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


def assert_grad_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 gradients within 1e-5 relative. A bf16 gradient must be a once-rounded fp32 gradient that
    agrees with the oracle: within half a bf16 ulp (2^-8 relative at worst, more than 2e-3) of a value
    within 1e-5 relative of the oracle's."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    exponent = torch.floor(torch.log2(want.abs().clamp(min=1e-30)))
    half_ulp = torch.exp2(exponent - 8)
    err = (got.float() - want).abs()
    bad = err > half_ulp + 1e-5 * want.abs() + 1e-6
    if bad.any():
        i = int(err.flatten().argmax())
        raise AssertionError(
            f"{int(bad.sum())} bf16 gradient entries off by more than half an ulp; worst at flat index {i}: "
            f"got {got.flatten()[i].item()}, oracle {want.flatten()[i].item()}"
        )


SHAPES = [  # (N, V, k, temperature)
    (1, 1000, 1, 1.0),
    (37, 3001, 16, 0.7),
    (37, 1000, 64, 1.3),
]
OPTIONS = [(None, None), (-6.0, None), (None, 0.9), (-6.0, 0.6)]  # (logprob_floor, fkl_cover)


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
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"floor{o[0]}-cover{o[1]}")
@pytest.mark.parametrize("fkl_mode", ["paper", "tail", "renorm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-V{}-k{}-T{}".format(*s))
def test_token_terms_values_and_gradients_match_oracle(backend, dtype, options, fkl_mode, shape):
    n, vocab, k, temp = shape
    floor, cover = options
    teacher_logits, student_logits, targets = make_case(n, vocab, seed=7 * n + vocab + k, dtype=dtype)
    teacher = tk.teacher_topk_oracle(teacher_logits, targets, k, temp)
    ours = student_logits.clone().requires_grad_()
    ref = student_logits.float().clone().requires_grad_()  # the oracle in fp32 on the same values
    got = tk.token_terms(ours, targets, teacher, temp, fkl_mode, floor, cover, backend=backend)
    want = tk.token_terms_oracle(ref, targets, teacher, temp, fkl_mode, floor, cover)
    for name in got._fields:
        value = getattr(got, name)
        assert value.dtype == torch.float32 and value.shape == (n,)
        assert not torch.isnan(value).any(), name
        torch.testing.assert_close(value, getattr(want, name), **tolerances(torch.float32), msg=name)

    g = torch.Generator().manual_seed(1)
    w_lp, w_fkl = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    (got.logprob * w_lp + got.fkl * w_fkl).sum().backward()
    (want.logprob * w_lp + want.fkl * w_fkl).sum().backward()
    assert ours.grad.dtype == dtype
    assert not torch.isnan(ours.grad).any()
    assert_grad_close(ours.grad, ref.grad)
    assert torch.all(ours.grad[targets == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fkl_gradient_alone_matches_closed_form(backend):
    """d FKL / d z = (Q p - q 1[u in K]) / T for the paper mode without floor (ALGORITHM.md section 1)."""
    n, vocab, k, temp = 5, 777, 16, 0.8
    teacher_logits, student_logits, _ = make_case(n, vocab, seed=3)
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    finite = torch.isfinite(student_logits[0]).nonzero().squeeze(1)
    targets = finite[targets % len(finite)]
    teacher = tk.teacher_topk_oracle(teacher_logits, targets, k, temp)
    z = student_logits.clone().requires_grad_()
    tk.token_terms(z, targets, teacher, temp, backend=backend).fkl.sum().backward()
    p = torch.softmax(student_logits / temp, dim=1)
    q = teacher.logprobs.exp()
    expected = q.sum(1, keepdim=True) * p
    expected.scatter_add_(1, teacher.ids, -q)
    torch.testing.assert_close(z.grad, expected / temp, rtol=1e-5, atol=1e-6)


def test_tail_mode_is_never_negative_and_paper_mode_can_be():
    teacher_logits, _, targets = make_case(37, 1000, seed=11)
    student_logits = teacher_logits * 1.5  # sharper on the same top entries: truncated FKL < 0
    teacher = tk.teacher_topk(teacher_logits, targets, 8)
    tail = tk.token_terms(student_logits, targets, teacher, fkl_mode="tail").fkl
    paper = tk.token_terms(student_logits, targets, teacher, fkl_mode="paper").fkl
    assert tail.min() >= -1e-6
    assert paper.min() < 0  # the truncated estimate goes negative: the reason the tail bucket exists


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch_gives_zeros_and_zero_gradient(backend):
    teacher_logits, student_logits, _ = make_case(4, 1000, seed=5)
    targets = torch.full((4,), -100, device=DEVICE)
    teacher = tk.teacher_topk(teacher_logits, targets, 4, backend=backend)
    z = student_logits.clone().requires_grad_()
    terms = tk.token_terms(z, targets, teacher, fkl_mode="tail", backend=backend)
    (terms.logprob.sum() + terms.fkl.sum()).backward()
    assert all(torch.all(t == 0) for t in terms)
    assert torch.all(z.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    z = torch.zeros(0, 100, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    teacher = tk.teacher_topk(z.detach(), targets, 3, backend=backend)
    terms = tk.token_terms(z, targets, teacher, backend=backend)
    terms.fkl.sum().backward()
    assert terms.logprob.shape == (0,) and z.grad.shape == (0, 100)


# ----------------------------------------------------------------------------- from hidden states


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_from_hidden_matches_oracle_on_projected_logits(backend, dtype, with_bias):
    n, d, vocab, k, temp = 37, 24, 1000, 16, 0.9
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(n, d, generator=g)).to(dtype).to(DEVICE)
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

    leaves = [hidden, weight] + ([bias] if with_bias else [])
    ours = [t.clone().requires_grad_() for t in leaves]
    refs = [t.float().clone().requires_grad_() for t in leaves]
    ob = ours[2] if with_bias else None
    rb = refs[2] if with_bias else None
    got = tk.token_terms_from_hidden(ours[0], ours[1], targets, teacher_ref, temp, "tail", -8.0, None, ob, chunk_size=8, backend=backend)
    want = tk.token_terms_oracle(logits_of(refs[0], refs[1], rb), targets, teacher_ref, temp, "tail", -8.0, None)
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
    w = torch.linspace(-1, 1, n, device=DEVICE)
    (got.logprob * w + got.fkl).sum().backward()
    (want.logprob * w + want.fkl).sum().backward()
    for o, r in zip(ours, refs):
        assert o.grad.dtype == dtype
        assert_grad_close(o.grad, r.grad)


def test_from_hidden_chunk_size_does_not_change_results():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(50, 16, generator=g)
    weight = torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (50,), generator=g)
    teacher = tk.teacher_topk_from_hidden(torch.randn(50, 16, generator=g), weight, targets, 8)
    grads = []
    for chunk in (1, 7, 50, None):
        h = hidden.clone().requires_grad_()
        terms = tk.token_terms_from_hidden(h, weight, targets, teacher, chunk_size=chunk)
        (terms.logprob + terms.fkl).sum().backward()
        grads.append(h.grad)
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], rtol=1e-5, atol=1e-6)


def test_from_hidden_frozen_weight_gets_no_gradient():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(40, 8)
    targets = torch.randint(0, 40, (6,))
    teacher = tk.teacher_topk_from_hidden(torch.randn(6, 8), weight, targets, 4)
    tk.token_terms_from_hidden(hidden, weight, targets, teacher).logprob.sum().backward()
    assert hidden.grad is not None and weight.grad is None
