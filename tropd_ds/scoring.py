"""Teacher scoring: one teacher forward per micro-batch of rollouts, reduced at once to a TeacherTopK
per response token (sampled or prefix). Teacher logits never exist beyond one chunk of tokens."""

from __future__ import annotations

import contextlib

import torch
import tropd_kernels as tk

from .rollout import RolloutTokens, hook_free_gathered, zero3_offload


@torch.no_grad()
def score(teacher, rollout: RolloutTokens, micro_batch: int, k: int, temperature: float, gather: bool = False) -> list[tk.TeacherTopK]:
    """TeacherTopK of the selected targets, one per teacher micro-batch of `micro_batch` rollouts, in row order.

    `gather`: the whole teacher is gathered once for all micro-batches and run without ZeRO-3's
    per-module hooks (teacher.gather_params); otherwise ZeRO-3 gathers it layer by layer."""
    select = rollout.sampled | rollout.prefix
    out = []
    whole = hook_free_gathered(teacher) if gather and zero3_offload(teacher) is not None else contextlib.nullcontext()
    with whole:
        for start in range(0, rollout.input_ids.shape[0], micro_batch):
            rows = slice(start, start + micro_batch)
            fields = teacher(rollout.input_ids[rows], rollout.attention_mask[rows], select[rows], k, temperature)
            out.append(tk.TeacherTopK(*fields))
    return out


def concat(parts: list[tk.TeacherTopK]) -> tk.TeacherTopK:
    return tk.TeacherTopK(*(torch.cat(x) for x in zip(*parts)))


def split_rows(teacher: tk.TeacherTopK, select: torch.Tensor, micro_batch: int) -> list[tk.TeacherTopK]:
    """Cut a TeacherTopK over all selected tokens into the student's micro-batches of rows."""
    counts = [int(select[s : s + micro_batch].sum()) for s in range(0, select.shape[0], micro_batch)]
    pieces = [torch.split(t, counts) for t in teacher]
    return [tk.TeacherTopK(*fields) for fields in zip(*pieces)]
