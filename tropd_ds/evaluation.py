"""Evaluation: generate on held-out prompts and score the final answer by exact match (avg@n)."""

from __future__ import annotations

import math

import torch

from . import collectives
from .demo_task import is_correct
from .rollout import left_pad


def evaluate(rollout_engine, tokenizer, rows, cfg, device, batch_size: int = 64) -> dict:
    """accuracy (avg@n over `cfg.samples` samples per prompt) on `rows` (dicts with prompt ids and answer).

    Every rank runs the same number of generate calls (ZeRO-3 gathers are collective): prompts are
    split evenly and the last rank's share is padded with repeats that are not counted. Completions
    are the response positions of the rollout's mask (up to and including the first end token)."""
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    rank, world = collectives.rank_world()
    share = math.ceil(len(rows) / world)
    mine = rows[rank * share : (rank + 1) * share]
    counted = len(mine)
    mine = mine + [rows[0]] * (share - counted)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n_samples_per_prompt=cfg.samples)
    correct = torch.zeros(2, dtype=torch.float64)
    examples = []
    engine = rollout_engine.engine
    engine.eval()
    for start in range(0, share, batch_size):
        chunk = mine[start : start + batch_size]
        ids, mask = left_pad([r["ids"] for r in chunk], tokenizer.pad_token_id, device)
        batch = rollout_engine.generate(RolloutRequest(ids, mask), sampling)
        width = ids.shape[1]
        texts = [tokenizer.decode(row[width:][keep[width:].bool()], skip_special_tokens=True) for row, keep in zip(batch.input_ids, batch.attention_mask)]
        for j, text in enumerate(texts):
            pos = start + j // cfg.samples
            if pos >= counted:
                continue
            ok = is_correct(text, mine[pos]["answer"])
            correct += torch.tensor([float(ok), 1.0], dtype=torch.float64)
            if len(examples) < 3:
                examples.append({"completion": text, "answer": mine[pos]["answer"], "correct": ok})
    engine.train()
    correct = collectives.all_reduce(correct)
    return {"eval_accuracy": float(correct[0] / max(correct[1], 1.0)), "eval_completions": int(correct[1]), "eval_examples": examples}
