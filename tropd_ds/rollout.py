"""Rollout: the student samples responses through DeepSpeed's rollout module, optionally continuing
from a teacher prefix (off-policy guidance). Output masks say which targets are sampled and which
are teacher prefix.

Any `deepspeed.runtime.rollout.RolloutEngine` works here (HybridEngineRollout today, a
vLLM-backed engine later): this module only builds `RolloutRequest`s and reads `RolloutBatch`es.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .data import Prompt
from .objectives import draw_prefix_len


@dataclass
class RolloutTokens:
    input_ids: torch.Tensor  # [B, T] left-padded prompt (+ prefix) then response, right-padded
    attention_mask: torch.Tensor  # [B, T]
    sampled: torch.Tensor  # [B, T-1] bool: target t+1 was sampled by the student
    prefix: torch.Tensor  # [B, T-1] bool: target t+1 is a teacher-prefix token


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


_PINNED = -7_000_001  # a sub-module id no real module has


@contextlib.contextmanager
def _gathered_and_pinned(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        # ZeRO-3 releases a module's parameters after its forward unless a sub-module still uses
        # them; without this pin every decoded token would gather every layer again.
        for p in params:
            p.ds_active_sub_modules.add(_PINNED)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_PINNED)


def gathered_for_generation(engine, gather: bool):
    """Gather every parameter once for the whole generate call (fast when the model fits), or let
    ZeRO-3 gather layer by layer on each forward (slow, but any size)."""
    if not gather or not hasattr(engine, "zero_optimization_stage") or engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    return _gathered_and_pinned(engine)


def sample(
    rollout_engine,
    student,
    prompts: list[Prompt],
    prefixes: list[list[int]],
    sampling,
    gather: bool,
    pad_id: int,
    eos_id: int,
    device,
    micro_batch: int = 0,
) -> RolloutTokens:
    """One rollout per entry of `prompts` (already expanded to n per prompt), continuing after its prefix.

    `micro_batch` > 0 generates that many sequences at a time (the KV cache of a long generation
    is what limits it on a GPU); the results are right-padded to one width."""
    from deepspeed.runtime.rollout import ResponseTokenBatch, RolloutBatch, RolloutRequest

    seqs = [p.ids + pre for p, pre in zip(prompts, prefixes)]
    ids, mask = left_pad(seqs, pad_id, device)
    step = micro_batch if micro_batch > 0 else ids.shape[0]
    parts = []
    with gathered_for_generation(student, gather):
        for start in range(0, ids.shape[0], step):
            rows = slice(start, start + step)
            parts.append(rollout_engine.generate(RolloutRequest(ids[rows], mask[rows]), sampling))
    if len(parts) == 1:
        batch = parts[0]
    else:
        full = max(b.seq_len for b in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, full - t.shape[1]), value=v)  # noqa: E731
        batch = RolloutBatch(
            torch.cat([pad(b.input_ids, pad_id) for b in parts]),
            torch.cat([pad(b.attention_mask, 0) for b in parts]),
            torch.cat([b.response_start_idx for b in parts]),
        )
    targets = ResponseTokenBatch.from_rollout(batch)
    width = ids.shape[1]
    t = torch.arange(1, batch.seq_len, device=device).unsqueeze(0)  # position of each target
    lens = torch.tensor([len(pre) for pre in prefixes], device=device).unsqueeze(1)
    prefix = (t >= width - lens) & (t < width)
    sampled = targets.response_mask.clone()
    attention = batch.attention_mask.clone()
    for i, pre in enumerate(prefixes):
        if pre and pre[-1] == eos_id:  # the prefix already ends the response: fully off-policy
            sampled[i] = False
            attention[i, width:] = 0
    return RolloutTokens(batch.input_ids, attention, sampled.bool(), prefix)


def choose_prefixes(prompts: list[Prompt], step: int, total_steps: int, l_max: int, enabled: bool, generator: torch.Generator) -> list[list[int]]:
    """Per rollout, l ~ Uniform{0 .. min(l_max(step), |y_T|)} tokens of the teacher response."""
    out = []
    for p in prompts:
        if not enabled or not p.response_ids:
            out.append([])
            continue
        length = draw_prefix_len(step, total_steps, l_max, len(p.response_ids), generator)
        out.append(p.response_ids[:length])
    return out


def teacher_responses(teacher_rollout, prompts: list[Prompt], sampling, pad_id: int, eos_id: int, device) -> list[list[int]]:
    """Responses generated by the teacher engine (prefix_source = teacher), cut after the first EOS."""
    from deepspeed.runtime.rollout import RolloutRequest

    ids, mask = left_pad([p.ids for p in prompts], pad_id, device)
    batch = teacher_rollout.generate(RolloutRequest(ids, mask), sampling)
    out = []
    for row, m in zip(batch.input_ids[:, ids.shape[1] :].tolist(), batch.attention_mask[:, ids.shape[1] :].tolist()):
        resp = [tok for tok, keep in zip(row, m) if keep]
        if eos_id in resp:
            resp = resp[: resp.index(eos_id) + 1]
        out.append(resp)
    return out
