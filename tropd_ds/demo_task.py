"""The embedded demo task: chains of one-digit additions and subtractions with worked solutions.

    prompt    8+4-1-7=
    solution  8+4=12;12-1=11;11-7=4;#4

A character-level tokenizer (saved as a Hugging Face tokenizer folder), a problem generator with
disjoint train and held-out splits (answers are checked by `tropd_ds.evaluation.is_correct`).
Sizes and times are in docs/REFERENCE.md (the demo task and the shipped models).
"""

from __future__ import annotations

import random
from pathlib import Path

CHARS = list("0123456789+-=;#")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_tokenizer():
    """A PreTrainedTokenizerFast over single characters (18 tokens), no network needed."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def make_problem(rng: random.Random, operands: tuple[int, int] = (4, 5)) -> dict:
    """One problem: prompt, worked solution (the teacher's format) and the final answer."""
    n = rng.randint(*operands)
    nums = [rng.randint(0, 9) for _ in range(n)]
    total, prompt, steps = nums[0], str(nums[0]), []
    for x in nums[1:]:
        op = rng.choice("+-")
        if op == "-" and total - x < 0:
            op = "+"
        new = total + x if op == "+" else total - x
        prompt += f"{op}{x}"
        steps.append(f"{total}{op}{x}={new}")
        total = new
    return {"prompt": prompt + "=", "teacher_response": ";".join(steps) + f";#{total}", "answer": str(total)}


def make_split(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < count:
        row = make_problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def write_splits(out_dir: str | Path, n_train: int = 4000, n_eval: int = 500, seed: int = 0) -> tuple[Path, Path]:
    """Disjoint train and held-out JSONL files loadable with `datasets`."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held_out = make_split(n_eval, seed + 1)
    train = make_split(n_train, seed, exclude={r["prompt"] for r in held_out})
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
