"""Evaluation: generate on held-out prompts and check the final answer (avg@n with its standard error).

Answer checking lives here: exact match of the extracted answer (the last match of `eval.answer_pattern`
when one is set, a completion without a match being wrong; else the last \\boxed{...}, else the number
after '#', else the last number), then, with the `eval` extra installed, `math-verify` for what exact match
misses (fractions, expressions, units, LaTeX)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from . import collectives
from .config import answer_pattern
from .data import answer_text, encode_prompt, left_pad

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASH = re.compile(r"#\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def extract_answer(text: str, pattern: re.Pattern | None = None) -> str | None:
    """The final answer of a completion: the last match of `pattern` (its group, else the whole match) when
    given, else the last \\boxed{...}, else the number after '#', else the last number."""
    if pattern is not None:
        found = pattern.findall(text)  # with at most one group, findall gives that group or the whole match
        return found[-1].strip().replace(",", "") if found else None
    for rule in (_BOXED, _HASH, _NUMBER):
        found = rule.findall(text)
        if found:
            return found[-1].strip().replace(",", "")
    return None


def resolve_checker(name: str, what: str = "eval.answer_check") -> str:
    """'exact' or 'math_verify': auto is math_verify when the `eval` extra is installed."""
    from .extras import installed, require

    if name == "auto":
        return "math_verify" if installed("math_verify") else "exact"
    if name == "math_verify":
        require("math_verify", f"{what}=math_verify (or set {what}=exact)")
    return name


def equivalent(answer: str, completion: str) -> bool:
    """math-verify's verdict: the completion's final answer equals the reference mathematically."""
    from math_verify import parse, verify

    text = answer_text(answer).strip()
    try:
        # a bare reference answer is read as LaTeX math: as plain text, "2(x+1)" would parse as just 2
        gold = parse(text if "$" in text or "\\boxed" in text else f"${text}$") or parse(text)
        return bool(gold) and verify(gold, parse(completion))
    except Exception:  # math-verify gives up on some inputs (timeouts, sympy errors): not verified
        return False


def is_correct(completion: str, answer: str, checker: str = "exact", pattern: re.Pattern | None = None) -> bool:
    """Exact match of the extracted answer; with checker 'math_verify', math-verify for what it misses (on the
    whole completion, or on the pattern's answer alone when a pattern is given: no match, no credit)."""
    got = extract_answer(completion, pattern)
    if got is not None and got == answer_text(answer).strip().replace(",", ""):
        return True
    if checker != "math_verify":
        return False
    if pattern is not None:
        return got is not None and equivalent(answer, got)
    return equivalent(answer, completion)


def unmatched_pattern_warning(pattern_text: str, matched: int, completions: int, example: str | None) -> str | None:
    """A warning when an answer pattern was given and matched none of the completions: every one was then
    scored wrong, which says more about the pattern than the model."""
    if not pattern_text or matched or not completions:
        return None
    shown = (example or "")[:200]  # shown with repr: newlines as \n
    return (
        f"warning: the answer pattern {pattern_text!r} matched none of the {completions} completions, so each was "
        f"scored wrong; a completion reads {shown!r}. Check the pattern against the model's answer format"
    )


def avg_at_n(per_prompt: list[float]) -> tuple[float, float]:
    """Mean over prompts of each prompt's fraction of correct samples, and its standard error."""
    if not per_prompt:
        return 0.0, float("nan")
    mean = sum(per_prompt) / len(per_prompt)
    if len(per_prompt) < 2:
        return mean, float("nan")
    var = sum((p - mean) ** 2 for p in per_prompt) / (len(per_prompt) - 1)
    return mean, math.sqrt(var / len(per_prompt))


def held_out_set(
    rows, tokenizer, max_prompts: int, max_prompt_tokens: int, chat_template: bool, template_kwargs: dict | None = None
) -> list[dict]:
    """The first `max_prompts` rows as {"ids", "answer"} (a prompt longer than max_prompt_tokens keeps its
    last tokens)."""
    out = []
    for i in range(min(len(rows), max_prompts)):
        prompt = encode_prompt(tokenizer, rows[i], i, max_prompt_tokens, "truncate", chat_template, template_kwargs)
        out.append({"index": i, "ids": prompt.ids, "answer": answer_text(rows[i]["answer"])})
    return out


def evaluate(rollout_engine, tokenizer, rows, cfg, device, batch_size: int = 64, checker: str = "exact") -> dict:
    """accuracy (avg@n over `cfg.samples` samples per prompt, with its standard error over prompts) on `rows`
    (dicts with prompt ids and answer); "eval_records" holds this rank's per-prompt records.

    Every rank runs the same number of generate calls (ZeRO-3 gathers are collective): prompts are
    split evenly and the last rank's share is padded with repeats that are not counted. Completions
    are the response positions of the rollout's mask (up to and including the first end token)."""
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    pattern = answer_pattern(cfg.answer_pattern)
    rank, world = collectives.rank_world()
    share = math.ceil(len(rows) / world)
    mine = rows[rank * share : (rank + 1) * share]
    counted = len(mine)
    mine = mine + [rows[0]] * (share - counted)
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n_samples_per_prompt=cfg.samples
    )
    # correct, completions, completion tokens, prompts, sum and sum of squares of per-prompt accuracies,
    # completions the answer pattern matched
    correct = torch.zeros(7, dtype=torch.float64)
    examples, records = (
        [],
        [{"index": r["index"], "answer": r["answer"], "completions": [], "correct": []} for r in mine],
    )
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
            ok = is_correct(text, mine[pos]["answer"], checker, pattern)
            correct[:3] += torch.tensor([float(ok), 1.0, float(completion.numel())], dtype=torch.float64)
            correct[6] += float(pattern is not None and extract_answer(text, pattern) is not None)
            records[pos]["completions"].append(text)
            records[pos]["correct"].append(ok)
            if len(examples) < 3:
                examples.append({"completion": text, "answer": mine[pos]["answer"], "correct": ok})
    engine.train()
    records = records[:counted]
    for r in records:
        p = sum(r["correct"]) / max(len(r["correct"]), 1)
        correct[3:6] += torch.tensor([1.0, p, p * p], dtype=torch.float64)
    correct = collectives.all_reduce(correct)
    prompts, total, squares = float(correct[3]), float(correct[4]), float(correct[5])
    mean = total / max(prompts, 1.0)
    var = (squares - prompts * mean * mean) / (prompts - 1) if prompts > 1 else float("nan")
    return {
        "eval_accuracy": float(correct[0] / max(correct[1], 1.0)),
        # standard error of avg@n over prompts (samples of one prompt are not independent draws of the task)
        "eval_accuracy_stderr": math.sqrt(max(var, 0.0) / prompts) if prompts > 1 else float("nan"),
        "eval_completions": int(correct[1]),
        # tokens per completion, end token included: how the student answers (one line, or worked steps)
        "eval_response_tokens": float(correct[2] / max(correct[1], 1.0)),
        "eval_examples": examples,
        "eval_records": records,
        "eval_pattern_matches": int(correct[6]),  # completions with an answer-pattern match (0 without a pattern)
    }


def write_records(path: Path, records: list[dict]) -> None:
    """Per-prompt records as JSON lines: index, answer, completions, correct (one entry per sample)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


class Schedule:
    """Held-out evaluation during a run: each result written to the metrics and logged; `summary` logs the
    first and last accuracy. Nothing happens without data.eval_path."""

    def __init__(self, rollout_engine, prepared, cfg, device, metrics, log):
        self.rollout_engine, self.tokenizer, self.cfg, self.device = rollout_engine, prepared.tokenizer, cfg, device
        self.metrics, self.log, self.accuracies = metrics, log, []
        self.checker = resolve_checker(cfg.eval.answer_check)
        self.rows = None
        if prepared.eval_rows is not None:
            d = cfg.data
            self.rows = held_out_set(
                prepared.eval_rows, self.tokenizer, cfg.eval.max_prompts, d.max_prompt_tokens, d.chat_template,
                d.chat_template_kwargs,
            )  # fmt: skip

    def evaluate(self, step: int) -> None:
        if self.rows is None:
            return
        result = evaluate(
            self.rollout_engine, self.tokenizer, self.rows, self.cfg.eval, self.device, checker=self.checker
        )
        rank = collectives.rank_world()[0]
        # each rank's share of the prompts: logs/eval/step<N>-rank<r>.jsonl
        write_records(Path(self.cfg.logging.dir) / "eval" / f"step{step}-rank{rank}.jsonl", result.pop("eval_records"))
        examples = result.pop("eval_examples")
        warning = unmatched_pattern_warning(
            self.cfg.eval.answer_pattern, result.pop("eval_pattern_matches"), result["eval_completions"],
            examples[0]["completion"] if examples else None,
        )  # fmt: skip
        if warning:
            self.log(f"step {step}: {warning}")
        self.metrics.write(step, result | {"eval_examples": examples})
        self.accuracies.append((step, result["eval_accuracy"]))
        self.log(
            f"step {step}: held-out accuracy {result['eval_accuracy']:.3f} ± {result['eval_accuracy_stderr']:.3f} "
            f"({result['eval_completions']} completions, {self.checker} answer check"
            + (f" on the last match of {self.cfg.eval.answer_pattern!r})" if self.cfg.eval.answer_pattern else ")")
        )

    def summary(self) -> None:
        if len(self.accuracies) >= 2:
            (s0, a0), (s1, a1) = self.accuracies[0], self.accuracies[-1]
            self.log(
                f"held-out accuracy: {a0:.3f} at step {s0} -> {a1:.3f} at step {s1}; metrics in {self.metrics.path}"
            )
