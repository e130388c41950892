"""The student op: logits or final hidden states plus a TeacherTopK -> TokenTerms (log-prob of the
sampled token, top-k forward KL, entropy, mass on the teacher's top-k), differentiable through one
fused backward of the vocabulary pass."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from ..backend import backend_module
from ..contract import (
    IGNORE_INDEX,
    KernelOptions,
    TeacherTopK,
    TokenTerms,
    check_logits_targets,
    check_teacher,
)
from ..projection import addmm_fp32_, check_projection, chunk_rows, matmul_operand, mm_fp32, project, real_columns
from ..topk_fkl import student_terms


@dataclass(frozen=True)
class VocabPass:
    """What each autograd Function below needs besides its tensors: one value, saved on ctx as is."""

    temperature: float
    backend: ModuleType  # vocab_pass_torch or vocab_pass_triton
    rows: int = 0  # tokens per projected [rows, V] block (hidden-state input only)
    vocab: int = 0  # the real columns of a projected block (hidden-state input only): the rest are masked out


class _VocabReduce(torch.autograd.Function):
    """logits [N, V] -> (lse [N], z / T at gather_ids [N, G], entropy [N]); fused backward."""

    @staticmethod
    def forward(ctx, logits, gather_ids, vocab_pass: VocabPass):
        lse, gathered, entropy, _, _ = vocab_pass.backend.forward(logits, gather_ids, vocab_pass.temperature)
        ctx.save_for_backward(logits, lse, gather_ids)
        ctx.vocab_pass = vocab_pass
        ctx.mark_non_differentiable(entropy)
        return lse, gathered, entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_gathered, _grad_entropy):
        logits, lse, gather_ids = ctx.saved_tensors
        vp = ctx.vocab_pass
        grad_lse, grad_gathered = _dense_grads(lse, gather_ids, grad_lse, grad_gathered)
        safe_lse = torch.where(torch.isinf(lse), 0.0, lse)
        grad = vp.backend.backward(logits, safe_lse, gather_ids, grad_lse, grad_gathered, vp.temperature)
        return grad, None, None


class _HiddenVocabReduce(torch.autograd.Function):
    """hidden [N, d] @ weight[V, d].T in token chunks -> (lse, gathered, entropy); recomputed backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, gather_ids, vocab_pass: VocabPass):
        n, rows = hidden.shape[0], vocab_pass.rows
        w_mm = matmul_operand(weight)
        lse = torch.empty(n, device=hidden.device)
        entropy = torch.empty(n, device=hidden.device)
        gathered = torch.empty(gather_ids.shape, device=hidden.device)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            logits = real_columns(project(hidden[sl], w_mm, bias), vocab_pass.vocab)
            lse[sl], gathered[sl], entropy[sl], _, _ = vocab_pass.backend.forward(
                logits, gather_ids[sl], vocab_pass.temperature
            )
            del logits
        ctx.save_for_backward(hidden, weight, bias, lse, gather_ids)
        ctx.vocab_pass = vocab_pass
        ctx.mark_non_differentiable(entropy)
        return lse, gathered, entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_gathered, _grad_entropy):
        hidden, weight, bias, lse, gather_ids = ctx.saved_tensors
        vp = ctx.vocab_pass
        grad_lse, grad_gathered = _dense_grads(lse, gather_ids, grad_lse, grad_gathered)
        safe_lse = torch.where(torch.isinf(lse), 0.0, lse)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w_mm = matmul_operand(weight)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device) if need_b and bias is not None else None
        for start in range(0, hidden.shape[0], vp.rows):
            sl = slice(start, start + vp.rows)
            logits = project(hidden[sl], w_mm, bias)  # all of the head's rows: the gradient's layout
            real = real_columns(logits, vp.vocab)
            vp.backend.backward(
                real, safe_lse[sl], gather_ids[sl], grad_lse[sl], grad_gathered[sl], vp.temperature, out=real
            )
            if real is not logits:
                logits[:, vp.vocab :] = 0.0  # masked-out rows of the head: no gradient
            g = logits
            g_mm = g.to(w_mm.dtype) if need_h or need_w else None  # rounded once, for both products
            if need_h:
                grad_h[sl] = mm_fp32(g_mm, w_mm)
            if need_w:
                addmm_fp32_(grad_w, g_mm.t(), matmul_operand(hidden[sl]))
            if grad_b is not None:
                grad_b += g.sum(0)
            del logits, g, g_mm
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _dense_grads(lse, gather_ids, grad_lse, grad_gathered):
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    if grad_gathered is None:
        grad_gathered = torch.zeros(gather_ids.shape, device=lse.device)
    return grad_lse.float(), grad_gathered.float()


def _gather_ids(targets: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """The columns the student's terms read: the teacher's k ids, then the target."""
    return torch.cat([teacher.ids, targets.clamp(min=0).long().unsqueeze(1)], dim=1)


def _options(options, temperature, fkl_mode, logprob_floor, fkl_cover) -> KernelOptions:
    """One checked KernelOptions: `options` when given (then the separate arguments keep their defaults)."""
    if options is None:
        return KernelOptions(temperature, fkl_mode, logprob_floor, fkl_cover)
    if not isinstance(options, KernelOptions):
        raise ValueError(f"options is a {type(options).__name__}: expected a tropd_kernels.KernelOptions")
    if (temperature, fkl_mode, logprob_floor, fkl_cover) != (1.0, "paper", None, None):
        raise ValueError("pass either options=KernelOptions(...) or temperature / fkl_mode / logprob_floor / fkl_cover")
    return options


def token_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherTopK,
    temperature: float = 1.0,
    fkl_mode: str = "paper",
    logprob_floor: float | None = None,
    fkl_cover: float | None = None,
    *,
    options: KernelOptions | None = None,
    backend: str | None = None,
) -> TokenTerms:
    """Student terms from logits [N, V]; logprob and fkl are differentiable w.r.t. logits."""
    check_logits_targets(logits, targets)
    check_teacher(teacher, targets, logits.shape[1])
    opts = _options(options, temperature, fkl_mode, logprob_floor, fkl_cover)
    vocab_pass = VocabPass(opts.temperature, backend_module(backend, logits.device))
    lse, gathered, entropy = _VocabReduce.apply(logits, _gather_ids(targets, teacher), vocab_pass)
    return student_terms(lse, gathered, entropy, targets != IGNORE_INDEX, teacher.logprobs, opts)


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
    options: KernelOptions | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    vocab: int | None = None,
) -> TokenTerms:
    """Student terms from hidden states; gradients flow to hidden, weight and bias (fp32 accumulation).
    `vocab`: the distribution is over weight's first `vocab` rows (a tokenizer's tokens); the rows past it (a
    head padded to a multiple of 64) are projected, keeping the logits' rows aligned, but masked out and get
    no gradient. None: all rows."""
    vocab = check_projection(hidden, weight, bias, targets, vocab)
    check_teacher(teacher, targets, vocab)
    opts = _options(options, temperature, fkl_mode, logprob_floor, fkl_cover)
    rows = chunk_rows(weight.shape[0], chunk_size, hidden.device)
    vocab_pass = VocabPass(opts.temperature, backend_module(backend, hidden.device), rows, vocab)
    lse, gathered, entropy = _HiddenVocabReduce.apply(hidden, weight, bias, _gather_ids(targets, teacher), vocab_pass)
    return student_terms(lse, gathered, entropy, targets != IGNORE_INDEX, teacher.logprobs, opts)
