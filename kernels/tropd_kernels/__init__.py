"""Fused vocabulary kernels for on-policy distillation.

The vocabulary dimension is reduced in one streaming pass per row (online max and log-sum-exp),
so no [N, V] softmax is ever materialised. Backends: `triton` (CUDA, or CPU under
TRITON_INTERPRET=1) and `torch` (chunked PyTorch, the CPU default); `TROPD_KERNELS_BACKEND`
forces one. `oracle` holds the naive full-softmax reference.
"""

from .contract import IGNORE_INDEX, TeacherTopK, TokenTerms
from .ops import (
    BACKENDS,
    resolve_backend,
    teacher_topk,
    teacher_topk_from_hidden,
    token_terms,
    token_terms_from_hidden,
)
from .oracle import teacher_topk_oracle, token_terms_oracle

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
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
