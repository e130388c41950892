"""Fused vocabulary kernels for on-policy distillation.

The vocabulary dimension is reduced in one streaming pass per row (online max and log-sum-exp),
so no [N, V] softmax is ever materialised. Backends: `triton` (CUDA, or CPU under
TRITON_INTERPRET=1) and `torch` (chunked PyTorch, the CPU default); `TROPD_KERNELS_BACKEND`
forces one. `oracle` holds the naive full-softmax reference.

One file per part: `contract` (result types, KernelOptions, argument checks), `backend` (which
implementation runs), `ops/teacher_topk` and `ops/token_terms` (the two ops, each with a `_from_hidden`
variant), `projection` (hidden states to logits chunk by chunk), `topk_fkl` (the per-token terms
after the vocabulary pass), `vocab_pass_torch` / `vocab_pass_triton` (the streaming pass itself).
"""

from .backend import BACKENDS, resolve_backend
from .contract import IGNORE_INDEX, KernelOptions, TeacherTopK, TokenTerms
from .ops.teacher_topk import teacher_topk, teacher_topk_from_hidden
from .ops.token_terms import token_terms, token_terms_from_hidden
from .oracle import teacher_topk_oracle, token_terms_oracle

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "KernelOptions",
    "TeacherTopK",
    "TokenTerms",
    "resolve_backend",
    "teacher_topk",
    "teacher_topk_from_hidden",
    "teacher_topk_oracle",
    "token_terms",
    "token_terms_from_hidden",
    "token_terms_oracle",
]
