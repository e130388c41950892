"""Per-token student terms from the vocabulary pass: log-prob, top-k forward KL and its variants, or the
top-k generalized JSD (KernelOptions.divergence).

Everything here works on [N] and [N, k] tensors (the vocabulary dimension was reduced before), so
plain autograd gives the exact gradients of the top-k FKL (docs/METHOD.md); they reach the logits through
the fused backward of the vocabulary pass as d/d lse and d/d gathered logits.
"""

from __future__ import annotations

import math

import torch

from .contract import KernelOptions, TokenTerms

TAIL_FLOOR = 1e-12  # smallest student tail mass used inside log(s_tail)


def kept_entries(teacher_logprobs: torch.Tensor, fkl_cover: float | None) -> torch.Tensor:
    """Which of the teacher's top-k entries enter the FKL: nonzero mass, within the coverage prefix."""
    q = teacher_logprobs.exp()
    keep = q > 0
    if fkl_cover is not None:
        mass_before = torch.cumsum(q, dim=1) - q
        keep &= mass_before < fkl_cover
    return keep


def student_terms(
    lse: torch.Tensor,
    gathered: torch.Tensor,
    entropy: torch.Tensor,
    valid: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    options: KernelOptions,
) -> TokenTerms:
    """gathered holds z / T at the teacher's k ids followed by the target id."""
    fkl_mode, logprob_floor, fkl_cover = options.fkl_mode, options.logprob_floor, options.fkl_cover
    # Ignored rows are neutralised on the inputs, so no inf or NaN can leak into their gradients.
    lse = torch.where(valid, lse, 0.0)
    gathered = torch.where(valid.unsqueeze(1), gathered, 0.0)
    teacher_logprobs = torch.where(valid.unsqueeze(1), teacher_logprobs, 0.0)

    logprobs = gathered - lse.unsqueeze(1)
    logprob, lp_k = logprobs[:, -1], logprobs[:, :-1]

    keep = kept_entries(teacher_logprobs, fkl_cover)
    log_q = torch.where(keep, teacher_logprobs, 0.0)
    q = torch.where(keep, log_q.exp(), 0.0)
    q_sum = q.sum(1)
    student_mass = torch.where(keep, lp_k.exp(), 0.0).sum(1)

    if options.divergence == "jsd":
        fkl = _jsd(q, log_q, lp_k, keep, student_mass, options)
    else:
        fkl = _fkl(q, log_q, q_sum, lp_k, keep, student_mass, fkl_mode, logprob_floor)

    return TokenTerms(
        logprob=torch.where(valid, logprob, 0.0),
        fkl=torch.where(valid, fkl, 0.0),
        entropy=torch.where(valid, entropy, 0.0),
        topk_mass=torch.where(valid, student_mass.detach(), 0.0),
    )


def _fkl(q, log_q, q_sum, lp_k, keep, student_mass, fkl_mode: str, logprob_floor: float | None) -> torch.Tensor:
    """sum_i q_i (log q_i - lp_i) over the kept entries (renorm: q renormalised; tail: plus the tail bucket)."""
    lp_in = lp_k if logprob_floor is None else torch.clamp(lp_k, min=logprob_floor)
    if fkl_mode == "renorm":
        log_norm = q_sum.clamp(min=torch.finfo(torch.float32).tiny).log().unsqueeze(1)
        q, log_q = q / log_norm.exp(), log_q - log_norm
    fkl = torch.where(keep, q * (log_q - lp_in), 0.0).sum(1)
    if fkl_mode == "tail":
        q_tail = (1 - q_sum).clamp(min=0)
        s_tail = (1 - student_mass).clamp(min=TAIL_FLOOR)
        log_q_tail = torch.where(q_tail > 0, q_tail, 1.0).log()
        fkl = fkl + q_tail * (log_q_tail - s_tail.log())
    return fkl


def _mixture_terms(p, log_p, log_m):
    """p (log p - log M) per entry, 0 where p = 0 (also when log p = -inf), gradients finite."""
    has = p > 0
    return torch.where(has, p * (torch.where(has, log_p, 0.0) - log_m), 0.0)


def _jsd(q, log_q, lp_k, keep, student_mass, options: KernelOptions) -> torch.Tensor:
    """beta KL(q || M) + (1 - beta) KL(s || M) over the kept entries (renorm: both renormalised over them;
    tail: plus one bucket for the mass outside them), M = beta q + (1 - beta) s."""
    beta = options.jsd_beta
    # Entries outside `keep` hold finite placeholders (masked below): no inf - inf in any gradient.
    lp_s = torch.where(keep, lp_k, 0.0)
    if options.fkl_mode == "renorm":
        tiny = torch.finfo(torch.float32).tiny
        q_norm = q.sum(1, keepdim=True).clamp(min=tiny)
        q, log_q = q / q_norm, log_q - q_norm.log()
        lp_s = lp_s - student_mass.clamp(min=tiny).log().unsqueeze(1)
    s = torch.where(keep, lp_s.exp(), 0.0)
    log_q = torch.where(keep, log_q, 0.0)
    log_m = torch.logaddexp(log_q + math.log(beta), lp_s + math.log(1 - beta))
    jsd = (beta * _mixture_terms(q, log_q, log_m) + (1 - beta) * _mixture_terms(s, lp_s, log_m)).sum(1)
    if options.fkl_mode == "tail":
        q_tail = (1 - q.sum(1)).clamp(min=0)
        s_tail = (1 - student_mass).clamp(min=0)
        m_tail = beta * q_tail + (1 - beta) * s_tail
        log_m_tail = torch.where(m_tail > 0, m_tail, 1.0).log()
        log_q_tail = torch.where(q_tail > 0, q_tail, 1.0).log()
        log_s_tail = torch.where(s_tail > 0, s_tail, 1.0).log()
        jsd = jsd + beta * _mixture_terms(q_tail, log_q_tail, log_m_tail)
        jsd = jsd + (1 - beta) * _mixture_terms(s_tail, log_s_tail, log_m_tail)
    return jsd
