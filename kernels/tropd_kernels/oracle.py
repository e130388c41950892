"""Naive reference: full-vocabulary log_softmax in fp32, gradients by autograd.

The test oracle and the benchmark baseline. It materialises [N, V] tensors on purpose and shares
no code with the streaming backends, so agreement between them means something.
"""

from __future__ import annotations

import torch

from .contract import IGNORE_INDEX, TeacherTopK, TokenTerms


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """fp32 at least; float64 when given float64 (an fp32 log-sum-exp over 150k+ entries is off by ~2e-5)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def teacher_topk_oracle(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    with torch.no_grad():
        logp = torch.log_softmax(_wide(logits) / temperature, dim=-1)
        valid = targets != IGNORE_INDEX
        top = logp.topk(k, dim=-1)
        tgt = logp.gather(1, targets.clamp(min=0).long().unsqueeze(1)).squeeze(1)
        v2 = valid.unsqueeze(1)
        return TeacherTopK(
            ids=torch.where(v2, top.indices, 0),
            logprobs=torch.where(v2, top.values, 0.0),
            target_logprob=torch.where(valid, tgt, 0.0),
            entropy=torch.where(valid, _entropy(logp), 0.0),
        )


def token_terms_oracle(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherTopK,
    temperature: float = 1.0,
    fkl_mode: str = "paper",
    logprob_floor: float | None = None,
    fkl_cover: float | None = None,
    divergence: str = "fkl",
    jsd_beta: float = 0.5,
) -> TokenTerms:
    """Differentiable with respect to `logits` through ordinary autograd."""
    logp = torch.log_softmax(_wide(logits) / temperature, dim=-1)
    valid = targets != IGNORE_INDEX
    logprob = logp.gather(1, targets.clamp(min=0).long().unsqueeze(1)).squeeze(1)
    lp_k = logp.gather(1, teacher.ids)

    q = teacher.logprobs.exp()
    keep = q > 0
    if fkl_cover is not None:
        mass_before = torch.cumsum(q, dim=1) - q
        keep = keep & (mass_before < fkl_cover)
    q = torch.where(keep, q, 0.0)
    q_sum = q.sum(1)
    student_mass = torch.where(keep, lp_k.exp(), 0.0).sum(1)

    lp_in = lp_k if logprob_floor is None else torch.clamp(lp_k, min=logprob_floor)
    if divergence == "jsd":
        fkl = _jsd_oracle(teacher.logprobs, lp_k, keep, fkl_mode, jsd_beta)
    elif fkl_mode == "renorm":
        qn = q / q_sum.unsqueeze(1)
        fkl = torch.where(keep, qn * (torch.where(keep, qn, 1.0).log() - lp_in), 0.0).sum(1)
    else:
        log_q = torch.where(keep, teacher.logprobs, 0.0)
        fkl = torch.where(keep, q * (log_q - lp_in), 0.0).sum(1)
        if fkl_mode == "tail":
            q_tail = (1 - q_sum).clamp(min=0)
            s_tail = (1 - student_mass).clamp(min=1e-12)
            tail = q_tail * (torch.where(q_tail > 0, q_tail, 1.0).log() - s_tail.log())
            fkl = fkl + tail

    zero = torch.zeros((), device=logits.device)
    return TokenTerms(
        logprob=torch.where(valid, logprob, zero),
        fkl=torch.where(valid, fkl, zero),
        entropy=torch.where(valid, _entropy(logp.detach()), zero),
        topk_mass=torch.where(valid, student_mass.detach(), zero),
    )


def _kl_to_mixture(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_i p_i log(p_i / m_i) over the last dimension, 0 log 0 = 0."""
    ratio = torch.where(p > 0, p, 1.0) / torch.where(p > 0, m, 1.0)
    return torch.where(p > 0, p * ratio.log(), 0.0).sum(-1)


def _jsd_oracle(teacher_logprobs, lp_k, keep, fkl_mode: str, beta: float) -> torch.Tensor:
    """Generalized JSD on explicit distributions over the kept entries (renorm: renormalised; tail: plus a
    bucket for the rest), in probability space."""
    q = torch.where(keep, teacher_logprobs.exp(), 0.0)
    s = torch.where(keep, lp_k.exp(), 0.0)
    if fkl_mode == "renorm":
        q, s = q / q.sum(1, keepdim=True), s / s.sum(1, keepdim=True)
    elif fkl_mode == "tail":
        q = torch.cat([q, (1 - q.sum(1, keepdim=True)).clamp(min=0)], dim=1)
        s = torch.cat([s, (1 - s.sum(1, keepdim=True)).clamp(min=0)], dim=1)
    m = beta * q + (1 - beta) * s
    return beta * _kl_to_mixture(q, m) + (1 - beta) * _kl_to_mixture(s, m)
