"""`tropd-ds train | plan | eval | export`.

train   the distillation run (launch with `deepspeed --num_gpus N --module tropd_ds.train ...` for
        several ranks; `tropd-ds train` runs it in one process; `--dry-run` checks a config
        on the meta device without weights)
plan    memory budget per GPU and host and a step-time estimate, from configs alone
eval    held-out exact-match accuracy of an exported (Hugging Face) student folder
export  a Hugging Face folder from the newest DeepSpeed checkpoint of a run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _eval(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="tropd-ds eval", description="Exact-match accuracy (avg@n) of a model folder on held-out prompts."
    )
    ap.add_argument("model", help="a Hugging Face model folder (e.g. a run's export)")
    ap.add_argument(
        "--data", required=True, help="prompts with an 'answer' column (JSON/JSONL/Parquet/Arrow or a saved folder)"
    )
    ap.add_argument("--max-prompts", type=int, default=500)
    ap.add_argument("--samples", type=int, default=1, help="n of avg@n")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", default=None, help="also append the result as a JSON line to this file")
    args = ap.parse_args(argv)
    problems = [
        f"--{name.replace('_', '-')}={value}: expected an integer >= 1"
        for name, value in (("max_prompts", args.max_prompts), ("samples", args.samples),
                            ("max_new_tokens", args.max_new_tokens))
        if value < 1
    ]  # fmt: skip
    if not math.isfinite(args.temperature) or args.temperature < 0:
        problems.append(f"--temperature={args.temperature}: expected a finite number >= 0 (0 = greedy)")
    if args.out and Path(args.out).is_dir():
        problems.append(f"--out={args.out!r} is a folder: expected a file to append the result to")
    if problems:
        print(f"tropd-ds eval: {problems[0]}", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import ConfigError
    from .data import load_rows, render_prompt
    from .evaluation import is_correct

    try:
        rows = load_rows(args.data, what="--data")
    except ConfigError as exc:
        print(f"tropd-ds eval: {exc}", file=sys.stderr)
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"tropd-ds eval: {args.model!r} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    if "answer" not in rows.column_names:
        print(
            f"tropd-ds eval: --data {args.data!r} has columns {rows.column_names}: an 'answer' column is required",
            file=sys.stderr,
        )
        return 2
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    n = min(len(rows), args.max_prompts)
    correct = total = 0
    for start in range(0, n, 64):
        chunk = [rows[i] for i in range(start, min(n, start + 64))]
        enc = tok([render_prompt(tok, r["prompt"], False) for r in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else None,
                num_return_sequences=args.samples,
                pad_token_id=tok.pad_token_id,
            )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for j, text in enumerate(texts):
            correct += is_correct(text, chunk[j // args.samples]["answer"])
            total += 1
    result = {"model": args.model, "eval_accuracy": correct / max(total, 1), "eval_completions": total}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


def _export(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="tropd-ds export",
        description="Export a run's newest (or a named) DeepSpeed checkpoint as a Hugging Face folder.",
    )
    ap.add_argument("--config", required=True, help="the run's config (for the student folder and the checkpoint dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--tag", default=None, help="checkpoint tag, e.g. step200 (default: the newest)")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or an earlier export)")
    ap.add_argument(
        "--force", action="store_true", help="replace the files of a non-empty folder that is not an export"
    )
    args = ap.parse_args(argv)
    from .checkpoint import check_export_target, export_from_checkpoint
    from .config import ConfigError, check_outside_models, load_config

    try:
        if not args.out.strip():
            raise ConfigError("--out is empty: expected a folder for the exported model")
        cfg = load_config(args.config, args.overrides)
        check_outside_models(cfg, "--out", args.out)
        check_export_target(args.out, args.force)
        path = export_from_checkpoint(cfg.checkpoint.dir, cfg.student.path, args.out, args.tag)
    except ConfigError as exc:
        print(f"tropd-ds export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("train", "plan", "eval", "export"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    if command == "plan":
        from .plan import main as plan_main

        return plan_main(rest)
    return _eval(rest) if command == "eval" else _export(rest)


if __name__ == "__main__":
    sys.exit(main())
