"""The kernel contract: bad input to tropd_kernels fails with a ValueError naming the argument and what is
accepted, in the ops and in KernelOptions."""

from __future__ import annotations

import pytest
import torch
import tropd_kernels as tk
from kernel_cases import DEVICE


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
        pytest.param(  # an id of its own: the parameter's text holds the word the mutation run deselects
            lambda x, t, te: tk.token_terms(x, t, te, backend="cuda"),
            r"backend='cuda'.*expected one of triton, torch",
            id="backend-cuda-token_terms",
        ),
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
        # kills ops.token_terms.x_token_terms_from_hidden__mutmut_6 (check_projection(hidden, weight, None, ...): the
        # bias is not checked, and logits.add_(bias) raises a RuntimeError instead)
        pytest.param(
            lambda x, t, te: tk.token_terms_from_hidden(x[:, :8], torch.randn(50, 8), t, te, bias=torch.zeros(3)),
            r"^bias has shape \(3,\): expected \[V\] with V=50$",
            id="from_hidden-terms-bias-shape",
        ),
        # kills ops.token_terms.x_token_terms_from_hidden__mutmut_32 (chunk_rows(weight.shape[0], None, ...): the chunk
        # size is not checked, and chunk_size=0 is not refused)
        pytest.param(
            lambda x, t, te: tk.token_terms_from_hidden(x[:, :8], torch.randn(50, 8), t, te, chunk_size=0),
            r"^chunk_size=0: expected None or an integer >= 1$",
            id="from_hidden-terms-chunk_size-0",
        ),
    ],
)
def test_bad_input_names_argument_and_accepted_values(call, match):
    logits, targets, teacher = good()
    with pytest.raises(ValueError, match=match):
        call(logits, targets, teacher)


BACKEND_CUDA = "backend='cuda' (argument or TROPD_KERNELS_BACKEND): expected one of triton, torch"


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda x, h, w, t, te: tk.teacher_topk(x, t, 3, backend="cuda"), id="backend-cuda-teacher_topk"),
        pytest.param(
            lambda x, h, w, t, te: tk.teacher_topk_from_hidden(h, w, t, 3, backend="cuda"),
            id="backend-cuda-teacher_topk_from_hidden",
        ),
        pytest.param(lambda x, h, w, t, te: tk.token_terms(x, t, te, backend="cuda"), id="backend-cuda-token_terms"),
        pytest.param(
            lambda x, h, w, t, te: tk.token_terms_from_hidden(h, w, t, te, backend="cuda"),
            id="backend-cuda-token_terms_from_hidden",
        ),
    ],
)
def test_every_op_refuses_an_unknown_backend_word_for_word(call):
    """Kills ops.teacher_topk.x_teacher_topk__mutmut_14, ops.teacher_topk.x_teacher_topk_from_hidden__mutmut_18,
    ops.token_terms.x_token_terms__mutmut_31 and ops.token_terms.x_token_terms_from_hidden__mutmut_45
    (backend_module(None, ...): the backend asked for is ignored, and the default one runs). The ids leave out
    the word the mutation run's -k deselects."""
    logits, targets, teacher = good()
    hidden, weight = logits[:, :8], torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError) as err:
        call(logits, hidden, weight, targets, teacher)
    assert str(err.value) == BACKEND_CUDA


def test_targets_on_another_device_are_refused_word_for_word():
    """A meta tensor reaches the device check on a CPU-only machine. Kills contract.x_check_targets__mutmut_17
    (ValueError(None))."""
    with pytest.raises(ValueError) as err:
        tk.teacher_topk(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long, device="meta"), 1)
    assert str(err.value) == "targets is on meta: expected the same device as the scores (cpu)"


def test_a_teacher_tensor_on_another_device_is_refused_word_for_word():
    """The entropy on meta passes the shape check and fails the device check. Kills contract.x_check_teacher__mutmut_51
    (message None), 52 (getattr(None, name)), 53 (getattr(teacher, None)), 54 (getattr(name)) and 55
    (getattr(teacher, )): the last four raise AttributeError or TypeError instead of the ValueError."""
    logits, targets, teacher = good()
    with pytest.raises(ValueError) as err:
        tk.token_terms(logits, targets, teacher._replace(entropy=teacher.entropy.to("meta")))
    assert str(err.value) == "teacher.entropy is on meta: expected cpu"


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
    """The whole message: kills ops.token_terms.x__options__mutmut_18 ("XXpass either ...XX", which a search for a part
    of the message still finds)."""
    logits, targets, teacher = good()
    with pytest.raises(ValueError) as err:
        tk.token_terms(logits, targets, teacher, 0.5, options=tk.KernelOptions(0.5))
    assert str(err.value) == (
        "pass either options=KernelOptions(...) or temperature / fkl_mode / logprob_floor / fkl_cover"
    )
    with pytest.raises(ValueError, match=r"options is a dict: expected a tropd_kernels.KernelOptions"):
        tk.token_terms(logits, targets, teacher, options={"temperature": 0.5})


# ----------------------------------------------------------------------------- the _from_hidden projection


def proj_case(n=4, d=8, v=30):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.tensor([0, 3, -100, v - 1])


ZERO3 = "(under ZeRO-3, call inside the lm_head's forward or gather the parameter first)"
D8 = "expected [V, d] with d=8"
DTYPES = "expected one of float32, bfloat16, float16"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, t: (h[0], w, None, t), "hidden has shape torch.Size([8]): expected [N, d]"),
        (lambda h, w, t: (h.tolist(), w, None, t), "hidden has shape None: expected [N, d]"),
        (lambda h, w, t: (h, w[:, :5], None, t), f"weight has shape (30, 5): {D8} {ZERO3}"),
        (lambda h, w, t: (h, w[0], None, t), f"weight has shape (8,): {D8} {ZERO3}"),
        (lambda h, w, t: (h, w.tolist(), None, t), f"weight has shape (): {D8} {ZERO3}"),
        (lambda h, w, t: (h.long(), w, None, t), f"hidden.dtype=torch.int64: {DTYPES}"),
        (lambda h, w, t: (h, w.double(), None, t), f"weight.dtype=torch.float64: {DTYPES}"),
        (lambda h, w, t: (h, w.to("meta"), None, t), "weight is on meta: expected cpu"),
        (lambda h, w, t: (h, w, torch.zeros(29), t), "bias has shape (29,): expected [V] with V=30"),
        (lambda h, w, t: (h, w, torch.zeros(30, device="meta"), t), "bias is on meta: expected cpu"),
        (lambda h, w, t: (h[:0], w[:0], None, t[:0]), "weight has V=0 rows: expected V >= 1"),
    ],
)  # fmt: skip
def test_the_projection_refuses_bad_shapes_dtypes_and_devices_with_the_whole_message(change, message):
    from tropd_kernels.projection import check_projection

    h, w, t = proj_case()
    with pytest.raises(ValueError) as refused:
        check_projection(*change(h, w, t))
    assert str(refused.value) == message
    check_projection(h, w, torch.zeros(30), t)  # the unchanged case passes, and so does one row
    check_projection(h, w[:1], None, torch.tensor([0, 0, -100, 0]))


def test_chunk_rows_follow_the_device_budget_or_the_callers_size():
    from tropd_kernels.projection import HIDDEN_CHUNK_BYTES, chunk_rows

    # 1 GiB on CUDA: on an H200, forward + backward at N=8192, V=128256, d=4096 took 60 ms against 72 ms
    # with 256 MiB (each block reads and writes the fp32 [V, d] weight gradient once), for 0.6 GiB more
    assert HIDDEN_CHUNK_BYTES == {"cuda": 2**30, "cpu": 64 * 2**20}
    assert chunk_rows(1000, None, torch.device("cpu")) == 64 * 2**20 // 4000
    assert chunk_rows(1000, None, torch.device("cuda")) == 2**30 // 4000
    assert chunk_rows(2**26, None, torch.device("cpu")) == 1  # a block budget smaller than one row
    assert chunk_rows(1000, 1, torch.device("cpu")) == 1 and chunk_rows(1000, 7, torch.device("cpu")) == 7
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"chunk_size={bad!r}: expected None or an integer >= 1"):
            chunk_rows(1000, bad, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_the_weight_gradient_accumulates_in_place_without_a_temporary(dtype):
    """fp32 operands: `addmm_` (any device); bf16 / fp16 ones, which stay so only on CUDA (`matmul_operand`):
    cuBLAS's fp32-output addmm into the accumulator."""
    from tropd_kernels.projection import addmm_fp32_

    if dtype != torch.float32 and DEVICE != "cuda":
        pytest.skip("bf16 / fp16 operands reach addmm_fp32_ on CUDA only")
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(5, 7, generator=g) * 0.5).to(dtype), (torch.randn(7, 4, generator=g) * 0.5).to(dtype)
    a, b = a.to(DEVICE), b.to(DEVICE)
    acc = torch.ones(5, 4, device=DEVICE)
    out = addmm_fp32_(acc, a, b)
    assert out.data_ptr() == acc.data_ptr() and acc.dtype == torch.float32
    addmm_fp32_(acc, a, b)
    torch.testing.assert_close(acc, 1 + 2 * (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # a bf16 second operand with fp32 ones is made fp32, as matmul_operand does
        addmm_fp32_(acc, a, b.bfloat16())
        torch.testing.assert_close(acc, 1 + 2 * a @ b + a @ b.bfloat16().float(), rtol=1e-5, atol=1e-5)


def test_cpu_matmuls_take_fp32_operands_and_give_an_fp32_result():
    from tropd_kernels.projection import matmul_operand, mm_fp32, project

    h, w, _ = proj_case()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert matmul_operand(w.to(dtype)).dtype == torch.float32  # CPU: fp32 operands whatever came in
    exact = h.double() @ w.double().t()
    for a, b in ((h, w.t()), (h, w.t().bfloat16())):  # (bf16 x bf16 with an fp32 result: CUDA only)
        out = mm_fp32(a, b)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)
    bias = torch.randn(30)
    torch.testing.assert_close(project(h, w, bias).double(), exact + bias.double(), rtol=1e-6, atol=1e-5)
    assert project(h, w, None).dtype == torch.float32


def test_the_compiled_backend_runs_on_cuda_when_installed_and_on_cpu_only_through_the_interpreter(monkeypatch):
    """(Named without the word the mutation run's `-k 'not triton'` leaves out: this case is fast.)"""
    import importlib.util

    from tropd_kernels import backend

    monkeypatch.delenv("TROPD_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend._triton_usable_on(torch.device("cpu"))
    assert not backend._triton_usable_on(torch.device("meta"))  # no interpreter for other devices
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend._triton_usable_on(torch.device("cpu"))
    installed = importlib.util.find_spec("triton") is not None
    assert backend._triton_usable_on(torch.device("cuda")) is installed
    assert backend.resolve_backend(None, torch.device("cuda")) == ("triton" if installed else "torch")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "triton" else object())
    assert not backend._triton_usable_on(torch.device("cuda"))
    assert backend.resolve_backend(None, torch.device("cuda")) == "torch"
