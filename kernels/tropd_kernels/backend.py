"""Which implementation of the vocabulary pass runs: `triton` or `torch`, per device and environment."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from . import vocab_pass_torch

BACKENDS = ("triton", "torch")


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
        raise ValueError(
            f"backend={choice!r} (argument or TROPD_KERNELS_BACKEND): expected one of {', '.join(BACKENDS)}"
        )
    if choice == "triton" and not _triton_usable_on(device):
        raise ValueError(
            f"backend='triton' cannot run on {device.type} tensors: use CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported, or backend='torch'"
        )
    return choice


def backend_module(backend: str | None, device: torch.device) -> ModuleType:
    """The module implementing the vocabulary pass (`forward`, `backward`) for `backend` on `device`."""
    if resolve_backend(backend, device) == "torch":
        return vocab_pass_torch
    from . import vocab_pass_triton

    return vocab_pass_triton
