"""GSM8K in the package's columns: `prompt`, `answer` and `teacher_response` (a worked solution, for
guidance from the data: `rollout.prefix_source: data`), with `datasets`.

The hub data set (openai/gsm8k, config `main`) has `question` and `answer`, the answer a worked solution with
calculator annotations (<<48/2=24>>) and a last line `#### 72`. Here the prompt asks for the final answer in
\\boxed{}, `answer` is the number after ####, and `teacher_response` is the solution without annotations,
ending in \\boxed{N}, the form the evaluation's default answer check reads.

    python examples/gsm8k/prepare.py --out data/gsm8k                          # from the hub (network once)
    python examples/gsm8k/prepare.py --source my_gsm8k.jsonl --out data/gsm8k  # a local copy, same schema

Writes OUT/train.jsonl and OUT/test.jsonl (the hub's splits; a local file becomes both unless --test-source
names the test split's file).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."
CALCULATOR = re.compile(r"<<[^<>]*>>")


def convert(row: dict) -> dict:
    """One hub row -> the package's columns; a row without a final '#### N' line is an error naming it."""
    solution, sep, final = row["answer"].rpartition("####")
    number = final.strip().replace(",", "")
    if not sep or not re.fullmatch(r"-?\d+(\.\d+)?", number):
        raise ValueError(f"a GSM8K answer without a final '#### <number>' line: {row['answer'][-120:]!r}")
    steps = CALCULATOR.sub("", solution).strip()
    return {
        "prompt": f"{row['question'].strip()}\n\n{INSTRUCTION}",
        "answer": number,
        "teacher_response": f"{steps}\nThe final answer is \\boxed{{{number}}}.",
    }


def load(source: str, split: str):
    from datasets import load_dataset

    path = Path(source)
    if path.exists() and not path.is_file():
        raise SystemExit(f"--source {source}: not a file (expected a .jsonl, .json, .parquet or .csv, or a hub id)")
    if not path.exists() and path.suffix in (".jsonl", ".json", ".parquet", ".csv"):
        raise SystemExit(f"--source {source}: no such file")
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise SystemExit(f"--source {source}: expected a .jsonl, .json, .parquet or .csv file, or a hub id")
        return load_dataset(kind, data_files=str(path), split="train")
    return load_dataset(source, "main", split=split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="openai/gsm8k", help="a hub id (config 'main') or a local file")
    ap.add_argument("--test-source", default=None, help="the test split's local file (default: --source's)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", args.source), ("test", args.test_source or args.source)):
        rows = load(source, split)
        missing = {"question", "answer"} - set(rows.column_names)
        if missing:
            raise SystemExit(f"{source}: no {', '.join(sorted(missing))} column (GSM8K's are question and answer)")
        converted = rows.map(convert, remove_columns=rows.column_names)
        converted.to_json(str(args.out / f"{split}.jsonl"), lines=True, force_ascii=False)
        print(f"{split}: {len(converted)} rows -> {args.out / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
