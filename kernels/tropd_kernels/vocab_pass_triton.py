"""The vocabulary pass as Triton kernels: one program per row, streaming over vocabulary blocks.

Forward keeps an online max, sum of exponentials and an entropy accumulator (all fp32). The
teacher's top-k is one torch.topk (radix select) over the same rows: an in-kernel streaming
top-k with `tl.topk` was measured at 1.4 s per 4,096-entry block under the interpreter and is
left for later. Backward writes p * g_lse / T over the row,
then, after a barrier, adds the gathered gradients at their ids with a single rounding to the
output dtype. Same signatures as `vocab_pass_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 8  # both kernels: 256 threads per row


def _block_size(vocab: int, on_gpu: bool) -> int:
    cap = 4096 if on_gpu else 8192  # the interpreter (CPU tensors) prefers few, wide blocks
    return min(triton.next_power_of_2(vocab), cap)


# The constexprs and launch options of each kernel, the only place they are chosen: the launchers below
# and tests/test_kernel_compile.py (which compiles every variant for sm_80 and sm_90 with ptxas) use them.
def forward_launch(vocab: int, on_gpu: bool) -> dict:
    """`_forward_kernel`'s constexprs and options for rows of `vocab` logits."""
    return {"BLOCK": _block_size(vocab, on_gpu), "num_warps": NUM_WARPS}


def backward_launch(
    vocab: int, n_gather: int, grad_dtype: torch.dtype, on_gpu: bool, read_back: bool | None = None
) -> dict:
    """`_backward_kernel`'s constexprs and options: rows of `vocab` logits, `n_gather` gathered columns,
    gradients written in `grad_dtype` (fp32: the gathered entries read the dense gradient back; bf16/fp16,
    on GPUs: they recompute it, which a read-back of a rounded value would not equal). `read_back` forces
    one branch (tests reach the GPU's recompute branch on CPU with it)."""
    return {
        "BLOCK": _block_size(vocab, on_gpu),
        "GP": triton.next_power_of_2(n_gather),
        "READ_BACK": grad_dtype == torch.float32 if read_back is None else read_back,
        "num_warps": NUM_WARPS,
    }


@triton.jit
def _online_update(z, m, s, a):
    """One block of z = logits / T into the running max m, sum s = sum e^(z - m) and a = sum e^(z - m) (z - m)."""
    neg_inf = float("-inf")
    m_new = tl.maximum(m, tl.max(z, 0))
    m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
    shift = tl.where(m == neg_inf, 0.0, m - m_ref)
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref)
    d = tl.where(z == neg_inf, 0.0, z - m_ref)  # e is 0 there: no -inf * 0
    a = alpha * (a + s * shift) + tl.sum(e * d, 0)
    s = alpha * s + tl.sum(e, 0)
    return m_new, s, a


@triton.jit
def _forward_kernel(
    x_ptr,
    stride_x,
    vocab,
    temperature,
    lse_ptr,
    ent_ptr,
    BLOCK: tl.constexpr,
):
    """The row's first `vocab` logits (columns past it, up to the row stride, are never read): the full
    blocks unmasked, which compile to vector loads where the row stride is a multiple of 16 elements
    (an lm_head's padded row count; the vocabulary width itself need not be), then one masked tail."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)  # sum of e^(z - m) * (z - m), for the entropy
    n_full = vocab // BLOCK
    for b in range(0, n_full):
        offs = b * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(x_row + offs).to(tl.float32) / temperature
        m, s, a = _online_update(z, m, s, a)
    if n_full * BLOCK < vocab:
        offs = n_full * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(x_row + offs, mask=offs < vocab, other=neg_inf).to(tl.float32) / temperature
        m, s, a = _online_update(z, m, s, a)
    m_ref = tl.where(m == neg_inf, 0.0, m)
    log_s = tl.log(s)
    tl.store(lse_ptr + row, m_ref + log_s)
    tl.store(ent_ptr + row, tl.where(s > 0, log_s - a / s, 0.0))


@triton.jit
def _backward_kernel(
    x_ptr,
    stride_x,
    g_ptr,
    stride_g,
    vocab,
    temperature,
    lse_ptr,
    glse_ptr,
    ids_ptr,
    ggat_ptr,
    n_gather,
    BLOCK: tl.constexpr,
    GP: tl.constexpr,
    READ_BACK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    lse = tl.load(lse_ptr + row)
    g_lse = tl.load(glse_ptr + row) / temperature
    n_full = vocab // BLOCK  # full blocks unmasked (vector loads and stores), then one masked tail
    for b in range(0, n_full):
        offs = b * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(x_row + offs).to(tl.float32) / temperature
        tl.store(g_row + offs, (tl.exp(z - lse) * g_lse).to(g_ptr.dtype.element_ty))
    if n_full * BLOCK < vocab:
        offs = n_full * BLOCK + tl.arange(0, BLOCK)
        in_row = offs < vocab
        z = tl.load(x_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) / temperature
        tl.store(g_row + offs, (tl.exp(z - lse) * g_lse).to(g_ptr.dtype.element_ty), mask=in_row)
    tl.debug_barrier()
    j = tl.arange(0, GP)
    ids = tl.load(ids_ptr + row * n_gather + j, mask=j < n_gather, other=-1)
    use = ids >= 0
    g_gat = tl.load(ggat_ptr + row * n_gather + j, mask=use, other=0.0) / temperature
    if READ_BACK:
        dense = tl.load(g_row + ids, mask=use, other=0.0)
    else:
        z = tl.load(x_row + ids, mask=use, other=float("-inf")).to(tl.float32) / temperature
        dense = tl.exp(z - lse) * g_lse
    tl.store(g_row + ids, (dense + g_gat).to(g_ptr.dtype.element_ty), mask=use)


def forward(logits: torch.Tensor, gather_ids: torch.Tensor, temperature: float, topk: int = 0):
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    n, vocab = logits.shape
    dev = logits.device
    lse = torch.empty(n, device=dev)
    entropy = torch.empty(n, device=dev)
    if n:
        _forward_kernel[(n,)](
            logits,
            logits.stride(0),
            vocab,
            float(temperature),
            lse,
            entropy,
            **forward_launch(vocab, logits.is_cuda),
        )
    gathered = logits.gather(1, gather_ids).float() / temperature
    top_vals = top_ids = None
    if topk:
        top = logits.topk(topk, dim=1)
        top_ids, top_vals = top.indices, top.values.float() / temperature
    return lse, gathered, entropy, top_vals, top_ids


def backward(logits, lse, gather_ids, grad_lse, grad_gathered, temperature, out=None, read_back=None):
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    n, vocab = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    ids = gather_ids.clone()
    g_gat = grad_gathered.float().clone()
    if ids.shape[1] > 1:  # the target column may repeat one of the teacher's ids: add it there once
        same = ids[:, :-1] == ids[:, -1:]
        g_gat[:, :-1] += torch.where(same, g_gat[:, -1:], 0.0)
        ids[:, -1] = torch.where(same.any(1), -1, ids[:, -1])
    # The interpreter truncates fp32 -> bf16/fp16 stores instead of rounding to nearest as GPUs do:
    # there, write fp32 and let torch round.
    target = out if out.dtype == torch.float32 or logits.is_cuda else torch.empty(out.shape, device=out.device)
    if n:
        _backward_kernel[(n,)](
            logits,
            logits.stride(0),
            target,
            target.stride(0),
            vocab,
            float(temperature),
            lse.contiguous(),
            grad_lse.float().contiguous(),
            ids.contiguous(),
            g_gat.contiguous(),
            ids.shape[1],
            **backward_launch(vocab, ids.shape[1], target.dtype, logits.is_cuda, read_back),
        )
    if target is not out:
        out.copy_(target)
    return out
