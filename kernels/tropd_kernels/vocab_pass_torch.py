"""The vocabulary pass in chunked PyTorch: the CPU default and the fallback everywhere.

Rows are processed in chunks so that only a few [chunk, V] fp32 buffers exist at a time.
Forward gives, per row, the log-sum-exp of z = logits / T, the full entropy, z at a few gathered
ids and optionally the top-k of z. Backward turns the incoming gradients of the log-sum-exp and of
the gathered values into d/d logits in one pass: (p * g_lse + scatter(g_gathered)) / T.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 16 * 2**20  # one fp32 [chunk, V] buffer; a pass holds about three of them


def rows_per_chunk(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.float()
    return z / temperature if temperature != 1.0 else z


def forward(
    logits: torch.Tensor, gather_ids: torch.Tensor, temperature: float, topk: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n, vocab = logits.shape
    dev = logits.device
    lse = torch.empty(n, device=dev)
    entropy = torch.empty(n, device=dev)
    gathered = torch.empty(gather_ids.shape, device=dev)
    top_vals = torch.empty(n, topk, device=dev) if topk else None
    top_ids = torch.empty(n, topk, device=dev, dtype=torch.int64) if topk else None
    step = rows_per_chunk(vocab)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        z = _scaled(logits[rows], temperature)
        # Work relative to the row max (like log_softmax): log p of a dominant token stays exact.
        row_max = z.amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isinf(row_max), 0.0, row_max)  # rows with no finite logit
        logp = z - row_max
        p = logp.exp()
        total = p.sum(1, keepdim=True)
        log_sum = total.log()
        lse[rows] = (row_max + log_sum).squeeze(1)
        logp -= log_sum
        p /= total
        entropy[rows] = -torch.nansum(logp.mul_(p), dim=1)  # -inf * 0 at masked entries counts as 0
        gathered[rows] = z.gather(1, gather_ids[rows])
        if topk:
            top = z.topk(topk, dim=1)
            top_vals[rows] = top.values
            top_ids[rows] = top.indices
    return lse, gathered, entropy, top_vals, top_ids


def backward(
    logits: torch.Tensor,
    lse: torch.Tensor,
    gather_ids: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_gathered: torch.Tensor,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d/d logits. `out` may be `logits` itself (in place) when it is fp32."""
    n, vocab = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    inv_t = 1.0 / temperature
    g_lse = grad_lse * inv_t
    g_gat = grad_gathered * inv_t
    step = rows_per_chunk(vocab)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        p = _scaled(logits[rows], temperature) - lse[rows].unsqueeze(1)
        p.exp_()
        p.mul_(g_lse[rows].unsqueeze(1))
        p.scatter_add_(1, gather_ids[rows], g_gat[rows])
        out[rows] = p
    return out
