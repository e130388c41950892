"""Logits from final hidden states, one chunk of tokens at a time: the shared part of the `_from_hidden` ops.

A [chunk, V] block of fp32 logits is the most that exists at once; its size follows the device."""

from __future__ import annotations

import torch

from .contract import FLOAT_DTYPES, check_targets

# One fp32 [chunk, V] block of logits in the _from_hidden variants: large on GPUs, where the matmul
# needs big tiles to reach its throughput; smaller on CPUs, where it does not.
HIDDEN_CHUNK_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}


def check_projection(hidden, weight, bias, targets, vocab: int | None = None) -> int:
    """The inputs of a _from_hidden op; returns the real vocabulary width (`check_vocab`)."""
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
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}: expected [V] with V={weight.shape[0]}")
    if bias is not None and bias.device != hidden.device:
        raise ValueError(f"bias is on {bias.device}: expected {hidden.device}")
    if weight.shape[0] < 1:
        raise ValueError("weight has V=0 rows: expected V >= 1")
    vocab = check_vocab(vocab, weight.shape[0])
    check_targets(targets, hidden.shape[0], vocab, hidden.device)
    return vocab


def check_vocab(vocab, rows: int) -> int:
    """The real vocabulary width of a head with `rows` rows: `vocab` (the first rows; those past it, an
    embedding table padded to a multiple of 64, are masked out), or all of them when None."""
    if vocab is None:
        return rows
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= rows:
        raise ValueError(f"vocab={vocab!r}: expected None or an integer in [1, {rows}] (the weight's rows)")
    return vocab


def real_columns(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The first `vocab` columns of a block of logits, as a view: rows keep the head's (aligned) stride."""
    return logits if vocab == logits.shape[1] else logits[:, :vocab]


def matmul_operand(t: torch.Tensor) -> torch.Tensor:
    """CUDA keeps bf16/fp16 operands and accumulates in fp32; elsewhere operands become fp32."""
    return t if t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) else t.float()


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result that was never rounded to a lower precision."""
    if a.dtype == torch.float32:
        return a @ b.float() if b.dtype != torch.float32 else a @ b
    return torch.mm(a, b.to(a.dtype), out_dtype=torch.float32)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b into the fp32 accumulator `acc` in place: no [V, d] temporary, one read and one write of
    `acc` inside the matmul (CUDA bf16/fp16 operands through cuBLAS's fp32-output addmm)."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b.float() if b.dtype != torch.float32 else b)
    return torch.addmm(acc, a, b.to(a.dtype), out_dtype=torch.float32, out=acc)


def project(h: torch.Tensor, w_mm: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits h W^T (+ b) of one chunk of tokens."""
    logits = mm_fp32(h.to(w_mm.dtype), w_mm.t())
    return logits if bias is None else logits.add_(bias.float())


def chunk_rows(vocab: int, chunk_size: int | None, device: torch.device) -> int:
    """Tokens per [chunk, V] block: `chunk_size`, or as many as the device's block budget holds."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}: expected None or an integer >= 1")
        return chunk_size
    budget = HIDDEN_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * vocab))
