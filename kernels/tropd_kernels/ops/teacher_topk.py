"""The teacher op: logits or final hidden states -> TeacherTopK (top-k ids and log-probs, the target's
log-prob, the full-vocabulary entropy) in one streaming pass per row, without gradients."""

from __future__ import annotations

import torch

from ..backend import backend_module
from ..contract import IGNORE_INDEX, TeacherTopK, check_k, check_logits_targets, check_temperature
from ..projection import check_projection, chunk_rows, matmul_operand, project, real_columns


def teacher_topk(
    logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float = 1.0, *, backend: str | None = None
) -> TeacherTopK:
    """Reduce teacher logits [N, V] to a TeacherTopK in one streaming pass per row."""
    check_logits_targets(logits, targets)
    check_k(k, logits.shape[1])
    temperature = check_temperature(temperature)
    impl = backend_module(backend, logits.device)
    target_ids = targets.clamp(min=0).long().unsqueeze(1)
    with torch.no_grad():
        lse, gathered, entropy, top_vals, top_ids = impl.forward(logits.detach(), target_ids, temperature, topk=k)
    return teacher_result(targets, lse, gathered[:, 0], entropy, top_vals, top_ids)


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
    vocab: int | None = None,
) -> TeacherTopK:
    """TeacherTopK from final hidden states [N, d] and the lm_head weight [V, d], chunk by chunk; `vocab` as
    in `token_terms_from_hidden` (rows past it masked out)."""
    vocab = check_projection(hidden, weight, bias, targets, vocab)
    check_k(k, vocab)
    temperature = check_temperature(temperature)
    impl = backend_module(backend, hidden.device)
    rows = chunk_rows(weight.shape[0], chunk_size, hidden.device)
    n = hidden.shape[0]
    dev = hidden.device
    lse, target_logit, entropy = (torch.empty(n, device=dev) for _ in range(3))
    top_vals = torch.empty(n, k, device=dev)
    top_ids = torch.empty(n, k, device=dev, dtype=torch.int64)
    target_ids = targets.clamp(min=0).long().unsqueeze(1)
    with torch.no_grad():
        w_mm = matmul_operand(weight.detach())
        b = None if bias is None else bias.detach()
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            logits = real_columns(project(hidden[sl].detach(), w_mm, b), vocab)
            lse[sl], gat, entropy[sl], top_vals[sl], top_ids[sl] = impl.forward(logits, target_ids[sl], temperature, k)
            target_logit[sl] = gat[:, 0]
            del logits
    return teacher_result(targets, lse, target_logit, entropy, top_vals, top_ids)


def teacher_result(targets, lse, target_logit, entropy, top_vals, top_ids) -> TeacherTopK:
    """Log-probs from the pass's log-sum-exp; ignored rows (target -100) all zeros."""
    valid = targets != IGNORE_INDEX
    v2 = valid.unsqueeze(1)
    return TeacherTopK(
        ids=torch.where(v2, top_ids, 0),
        logprobs=torch.where(v2, top_vals - lse.unsqueeze(1), 0.0),
        target_logprob=torch.where(valid, target_logit - lse, 0.0),
        entropy=torch.where(valid, entropy, 0.0),
    )
