"""Every collective tropd-ds issues, through one place that puts its tensors where the process
group's backend needs them: the accelerator's current device under NCCL (or any device backend),
where a CPU tensor raises, and CPU under gloo. Values go in and come back as CPU tensors or Python
objects, so callers never think about devices. A test fails if the package calls a
`torch.distributed` collective anywhere else."""

from __future__ import annotations

import torch
import torch.distributed as dist

CPU_BACKENDS = ("gloo",)
# how gloo reports a peer that has exited, in whichever way the socket saw it go
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_gone(error_text: str) -> bool:
    return any(x in error_text for x in PEER_GONE)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def device() -> torch.device:
    """Where this process group's collectives want their tensors."""
    if not active() or dist.get_backend() in CPU_BACKENDS:
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return torch.device(accelerator.device_name(), accelerator.current_device())


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(values, op: str = "sum") -> torch.Tensor:
    """Element-wise reduction of a list of numbers (or a tensor) over every rank; a CPU float64 tensor
    comes back. Without a process group, the values themselves."""
    local = torch.as_tensor(values, dtype=torch.float64).detach().flatten().cpu()
    if not active() or dist.get_world_size() == 1:
        return local
    t = local.to(device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
    return t.cpu()


def all_gather_object(obj) -> list:
    """`obj` of every rank, in rank order (pickled; torch moves the bytes to the current device itself)."""
    if not active() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (pickled)."""
    if not active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj, dst: int = 0) -> list | None:
    """`obj` of every rank, in rank order, on rank `dst` (None elsewhere): only `dst` holds them all."""
    if not active() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    if active() and dist.get_world_size() > 1:
        dist.barrier()
