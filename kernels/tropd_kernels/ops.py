"""Public entry points: teacher_topk, token_terms and their `_from_hidden` variants."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from . import vocab_pass_torch
from .contract import (
    FLOAT_DTYPES,
    IGNORE_INDEX,
    TeacherTopK,
    TokenTerms,
    check_fkl_options,
    check_k,
    check_logits_targets,
    check_targets,
    check_teacher,
    check_temperature,
)
from .topk_fkl import student_terms

BACKENDS = ("triton", "torch")
# One fp32 [chunk, V] block of logits in the _from_hidden variants: large on GPUs, where the matmul
# needs big tiles to reach its throughput; smaller on CPUs, where it does not.
HIDDEN_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}


def _triton_usable_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """`backend`, else $TROPD_KERNELS_BACKEND, else triton on CUDA and torch elsewhere."""
    choice = backend or os.environ.get("TROPD_KERNELS_BACKEND") or None
    if choice is None:
        return "triton" if device.type == "cuda" and _triton_usable_on(device) else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend={choice!r} (argument or TROPD_KERNELS_BACKEND): expected one of {', '.join(BACKENDS)}")
    if choice == "triton" and not _triton_usable_on(device):
        raise ValueError(
            f"backend='triton' cannot run on {device.type} tensors: use CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported, or backend='torch'"
        )
    return choice


def _backend_module(name: str) -> ModuleType:
    if name == "torch":
        return vocab_pass_torch
    from . import vocab_pass_triton

    return vocab_pass_triton


class _VocabReduce(torch.autograd.Function):
    """logits [N, V] -> (lse [N], z / T at gather_ids [N, G], entropy [N]); fused backward."""

    @staticmethod
    def forward(ctx, logits, gather_ids, temperature, backend):
        lse, gathered, entropy, _, _ = backend.forward(logits, gather_ids, temperature)
        ctx.save_for_backward(logits, lse, gather_ids)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.mark_non_differentiable(entropy)
        return lse, gathered, entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_gathered, _grad_entropy):
        logits, lse, gather_ids = ctx.saved_tensors
        grad_lse, grad_gathered = _dense_grads(lse, gather_ids, grad_lse, grad_gathered)
        safe_lse = torch.where(torch.isinf(lse), 0.0, lse)
        grad = ctx.backend.backward(logits, safe_lse, gather_ids, grad_lse, grad_gathered, ctx.temperature)
        return grad, None, None, None


def _dense_grads(lse, gather_ids, grad_lse, grad_gathered):
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    if grad_gathered is None:
        grad_gathered = torch.zeros(gather_ids.shape, device=lse.device)
    return grad_lse.float(), grad_gathered.float()


def _student_gather_ids(targets: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    return torch.cat([teacher.ids, targets.clamp(min=0).long().unsqueeze(1)], dim=1)


def teacher_topk(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float = 1.0, *, backend: str | None = None) -> TeacherTopK:
    """Reduce teacher logits [N, V] to a TeacherTopK in one streaming pass per row."""
    check_logits_targets(logits, targets)
    check_k(k, logits.shape[1])
    temperature = check_temperature(temperature)
    impl = _backend_module(resolve_backend(backend, logits.device))
    with torch.no_grad():
        lse, gathered, entropy, top_vals, top_ids = impl.forward(logits.detach(), targets.clamp(min=0).long().unsqueeze(1), temperature, topk=k)
    return _teacher_result(targets, lse, gathered[:, 0], entropy, top_vals, top_ids)


def _teacher_result(targets, lse, target_logit, entropy, top_vals, top_ids) -> TeacherTopK:
    valid = targets != IGNORE_INDEX
    v2 = valid.unsqueeze(1)
    return TeacherTopK(
        ids=torch.where(v2, top_ids, 0),
        logprobs=torch.where(v2, top_vals - lse.unsqueeze(1), 0.0),
        target_logprob=torch.where(valid, target_logit - lse, 0.0),
        entropy=torch.where(valid, entropy, 0.0),
    )


def token_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherTopK,
    temperature: float = 1.0,
    fkl_mode: str = "paper",
    logprob_floor: float | None = None,
    fkl_cover: float | None = None,
    *,
    backend: str | None = None,
) -> TokenTerms:
    """Student terms from logits [N, V]; logprob and fkl are differentiable w.r.t. logits."""
    check_logits_targets(logits, targets)
    check_teacher(teacher, targets, logits.shape[1])
    temperature = check_temperature(temperature)
    check_fkl_options(fkl_mode, logprob_floor, fkl_cover)
    impl = _backend_module(resolve_backend(backend, logits.device))
    lse, gathered, entropy = _VocabReduce.apply(logits, _student_gather_ids(targets, teacher), temperature, impl)
    return student_terms(lse, gathered, entropy, targets != IGNORE_INDEX, teacher.logprobs, fkl_mode, logprob_floor, fkl_cover)


# ----------------------------------------------------------------------------- from hidden states


def _check_projection(hidden, weight, bias, targets) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden has shape {getattr(hidden, 'shape', None)}: expected [N, d]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight has shape {tuple(getattr(weight, 'shape', ()))}: expected [V, d] with d={hidden.shape[1]} "
            "(under ZeRO-3, call inside the lm_head's forward or gather the parameter first)"
        )
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype}: expected one of float32, bfloat16, float16")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}: expected {hidden.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != hidden.device):
        raise ValueError(f"bias has shape {tuple(bias.shape)}: expected [V] with V={weight.shape[0]}")
    if weight.shape[0] < 1:
        raise ValueError("weight has V=0 rows: expected V >= 1")
    check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)


def _matmul_operand(t: torch.Tensor) -> torch.Tensor:
    """CUDA keeps bf16/fp16 operands and accumulates in fp32; elsewhere operands become fp32."""
    return t if t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) else t.float()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result that was never rounded to a lower precision."""
    if a.dtype == torch.float32:
        return a @ b.float() if b.dtype != torch.float32 else a @ b
    return torch.mm(a, b.to(a.dtype), out_dtype=torch.float32)


def _project(h, w_mm, bias):
    logits = _mm_fp32(h.to(w_mm.dtype), w_mm.t())
    return logits if bias is None else logits.add_(bias.float())


def _chunk_rows(vocab: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}: expected None or an integer >= 1")
        return chunk_size
    budget = HIDDEN_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * vocab))


class _HiddenVocabReduce(torch.autograd.Function):
    """hidden [N, d] @ weight[V, d].T in token chunks -> (lse, gathered, entropy); recomputed backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, gather_ids, temperature, backend, rows):
        n = hidden.shape[0]
        w_mm = _matmul_operand(weight)
        lse = torch.empty(n, device=hidden.device)
        entropy = torch.empty(n, device=hidden.device)
        gathered = torch.empty(gather_ids.shape, device=hidden.device)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            logits = _project(hidden[sl], w_mm, bias)
            lse[sl], gathered[sl], entropy[sl], _, _ = backend.forward(logits, gather_ids[sl], temperature)
            del logits
        ctx.save_for_backward(hidden, weight, bias, lse, gather_ids)
        ctx.temperature, ctx.backend, ctx.rows = temperature, backend, rows
        ctx.mark_non_differentiable(entropy)
        return lse, gathered, entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_gathered, _grad_entropy):
        hidden, weight, bias, lse, gather_ids = ctx.saved_tensors
        grad_lse, grad_gathered = _dense_grads(lse, gather_ids, grad_lse, grad_gathered)
        safe_lse = torch.where(torch.isinf(lse), 0.0, lse)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w_mm = _matmul_operand(weight)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device) if need_b and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.rows):
            sl = slice(start, start + ctx.rows)
            logits = _project(hidden[sl], w_mm, bias)
            g = ctx.backend.backward(logits, safe_lse[sl], gather_ids[sl], grad_lse[sl], grad_gathered[sl], ctx.temperature, out=logits)
            if need_h:
                grad_h[sl] = _mm_fp32(g.to(w_mm.dtype), w_mm)
            if need_w:
                grad_w += _mm_fp32(g.t().to(w_mm.dtype), _matmul_operand(hidden[sl]).to(w_mm.dtype))
            if grad_b is not None:
                grad_b += g.sum(0)
            del logits, g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def teacher_topk_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> TeacherTopK:
    """TeacherTopK from final hidden states [N, d] and the lm_head weight [V, d], chunk by chunk."""
    _check_projection(hidden, weight, bias, targets)
    check_k(k, weight.shape[0])
    temperature = check_temperature(temperature)
    impl = _backend_module(resolve_backend(backend, hidden.device))
    rows = _chunk_rows(weight.shape[0], chunk_size, hidden.device)
    n = hidden.shape[0]
    dev = hidden.device
    lse, target_logit, entropy = (torch.empty(n, device=dev) for _ in range(3))
    top_vals = torch.empty(n, k, device=dev)
    top_ids = torch.empty(n, k, device=dev, dtype=torch.int64)
    target_ids = targets.clamp(min=0).long().unsqueeze(1)
    with torch.no_grad():
        w_mm = _matmul_operand(weight.detach())
        b = None if bias is None else bias.detach()
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            logits = _project(hidden[sl].detach(), w_mm, b)
            lse[sl], gat, entropy[sl], top_vals[sl], top_ids[sl] = impl.forward(logits, target_ids[sl], temperature, k)
            target_logit[sl] = gat[:, 0]
            del logits
    return _teacher_result(targets, lse, target_logit, entropy, top_vals, top_ids)


def token_terms_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherTopK,
    temperature: float = 1.0,
    fkl_mode: str = "paper",
    logprob_floor: float | None = None,
    fkl_cover: float | None = None,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> TokenTerms:
    """Student terms from hidden states; gradients flow to hidden, weight and bias (fp32 accumulation)."""
    _check_projection(hidden, weight, bias, targets)
    check_teacher(teacher, targets, weight.shape[0])
    temperature = check_temperature(temperature)
    check_fkl_options(fkl_mode, logprob_floor, fkl_cover)
    impl = _backend_module(resolve_backend(backend, hidden.device))
    rows = _chunk_rows(weight.shape[0], chunk_size, hidden.device)
    lse, gathered, entropy = _HiddenVocabReduce.apply(hidden, weight, bias, _student_gather_ids(targets, teacher), temperature, impl, rows)
    return student_terms(lse, gathered, entropy, targets != IGNORE_INDEX, teacher.logprobs, fkl_mode, logprob_floor, fkl_cover)
