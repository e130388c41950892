"""Evaluation: generate on held-out prompts and score the final answer by exact match (avg@n).

Answer extraction lives here: the last \\boxed{...}, else the number after '#', else the last number."""

from __future__ import annotations

import math
import re

import torch

from . import collectives
from .data import encode_prompt
from .rollout import left_pad

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASH = re.compile(r"#\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{...}, else the number after '#', else the last number."""
    for pattern in (_BOXED, _HASH, _NUMBER):
        found = pattern.findall(text)
        if found:
            return found[-1].strip().replace(",", "")
    return None


def is_correct(completion: str, answer: str) -> bool:
    got = extract_answer(completion)
    return got is not None and got == str(answer).strip().replace(",", "")


def held_out_set(rows, tokenizer, max_prompts: int, max_prompt_tokens: int, chat_template: bool) -> list[dict]:
    """The first `max_prompts` rows as {"ids", "answer"} (a prompt longer than max_prompt_tokens keeps its
    last tokens)."""
    out = []
    for i in range(min(len(rows), max_prompts)):
        prompt = encode_prompt(tokenizer, rows[i], i, max_prompt_tokens, "truncate", chat_template)
        out.append({"ids": prompt.ids, "answer": str(rows[i]["answer"])})
    return out


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
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n_samples_per_prompt=cfg.samples
    )
    correct = torch.zeros(3, dtype=torch.float64)  # correct, completions, completion tokens
    examples = []
    engine = rollout_engine.engine
    engine.eval()
    for start in range(0, share, batch_size):
        chunk = mine[start : start + batch_size]
        ids, mask = left_pad([r["ids"] for r in chunk], tokenizer.pad_token_id, device)
        batch = rollout_engine.generate(RolloutRequest(ids, mask), sampling)
        width = ids.shape[1]
        completions = [row[width:][keep[width:].bool()] for row, keep in zip(batch.input_ids, batch.attention_mask)]
        for j, completion in enumerate(completions):
            pos = start + j // cfg.samples
            if pos >= counted:
                continue
            text = tokenizer.decode(completion, skip_special_tokens=True)
            ok = is_correct(text, mine[pos]["answer"])
            correct += torch.tensor([float(ok), 1.0, float(completion.numel())], dtype=torch.float64)
            if len(examples) < 3:
                examples.append({"completion": text, "answer": mine[pos]["answer"], "correct": ok})
    engine.train()
    correct = collectives.all_reduce(correct)
    return {
        "eval_accuracy": float(correct[0] / max(correct[1], 1.0)),
        "eval_completions": int(correct[1]),
        # tokens per completion, end token included: how the student answers (one line, or worked steps)
        "eval_response_tokens": float(correct[2] / max(correct[1], 1.0)),
        "eval_examples": examples,
    }


class Schedule:
    """Held-out evaluation during a run: each result written to the metrics and logged; `summary` logs the
    first and last accuracy. Nothing happens without data.eval_path."""

    def __init__(self, rollout_engine, prepared, cfg, device, metrics, log):
        self.rollout_engine, self.tokenizer, self.cfg, self.device = rollout_engine, prepared.tokenizer, cfg, device
        self.metrics, self.log, self.accuracies = metrics, log, []
        self.rows = None
        if prepared.eval_rows is not None:
            d = cfg.data
            self.rows = held_out_set(
                prepared.eval_rows, self.tokenizer, cfg.eval.max_prompts, d.max_prompt_tokens, d.chat_template
            )

    def evaluate(self, step: int) -> None:
        if self.rows is None:
            return
        result = evaluate(self.rollout_engine, self.tokenizer, self.rows, self.cfg.eval, self.device)
        examples = result.pop("eval_examples")
        self.metrics.write(step, result | {"eval_examples": examples})
        self.accuracies.append((step, result["eval_accuracy"]))
        self.log(
            f"step {step}: held-out accuracy {result['eval_accuracy']:.3f} ({result['eval_completions']} completions)"
        )

    def summary(self) -> None:
        if len(self.accuracies) >= 2:
            (s0, a0), (s1, a1) = self.accuracies[0], self.accuracies[-1]
            self.log(
                f"held-out accuracy: {a0:.3f} at step {s0} -> {a1:.3f} at step {s1}; metrics in {self.metrics.path}"
            )
