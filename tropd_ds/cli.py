"""`tropd-ds train | serve-teacher | plan | eval | export | config`.

train   the distillation run (launch with `deepspeed --num_gpus N --module tropd_ds.train ...` for
        several ranks; `tropd-ds train` runs it in one process; `--dry-run` checks a config
        on the meta device without weights)
serve-teacher  the teacher as a scoring service for runs on other machines (teacher.url); launch with
        `deepspeed --num_gpus N --module tropd_ds.teacher_service ...` for several ranks
plan    memory budget per GPU and host and a step-time estimate, from configs alone
eval    held-out accuracy (avg@n, standard error, per-prompt records) of a Hugging Face model folder
export  a Hugging Face folder from the newest DeepSpeed checkpoint of a run
config  every config field with its type, default, range and meaning (--list); a resolved config (--dump);
        where the shipped presets and DeepSpeed configs are (--presets)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from .exit_codes import ExitCode


def _eval(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="tropd-ds eval",
        description="Held-out accuracy (avg@n with its standard error) of a model folder, with per-prompt records.",
    )
    ap.add_argument("model", help="a Hugging Face model folder (e.g. a run's export) or a PEFT adapter folder")
    ap.add_argument(
        "--data", required=True, help="prompts with an answer column (JSON/JSONL/Parquet/Arrow or a saved folder)"
    )
    ap.add_argument(
        "--split",
        default=None,
        help="the split of --data to evaluate (default: its only split; data with several splits needs this)",
    )
    ap.add_argument("--max-prompts", type=int, default=500)
    ap.add_argument("--samples", type=int, default=1, help="n of avg@n (n > 1 needs --temperature > 0)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--batch-size", type=int, default=64, help="prompts generated at once")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: the dtype the model was saved in",
    )
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument(
        "--answer-check",
        default="auto",
        choices=("auto", "exact", "math_verify"),
        help="auto: math_verify when the eval extra is installed, else exact match",
    )
    ap.add_argument(
        "--answer-pattern",
        default="",
        help="a regular expression for the final answer (its group, else the whole match; the last match counts); "
        "a completion without a match is wrong. Default: the last \\boxed{...}, else the number after '#', else the "
        "last number",
    )
    ap.add_argument("--chat-template", action="store_true", help="render string prompts with the chat template")
    ap.add_argument("--chat-template-kwargs", default="{}", help="JSON, e.g. '{\"enable_thinking\": false}'")
    ap.add_argument("--prompt-column", default="prompt")
    ap.add_argument("--answer-column", default="answer")
    ap.add_argument("--messages-column", default="messages", help="conversations, used without a prompt column")
    ap.add_argument("--out", default=None, help="also append the result as a JSON line to this file")
    ap.add_argument("--records", default=None, help="per-prompt records (completions, verdicts) as JSON lines")
    args = ap.parse_args(argv)  # fmt: skip
    problems = [
        f"--{name.replace('_', '-')}={value}: expected an integer >= 1"
        for name, value in (("max_prompts", args.max_prompts), ("samples", args.samples),
                            ("max_new_tokens", args.max_new_tokens), ("batch_size", args.batch_size))
        if value < 1
    ]  # fmt: skip
    if not math.isfinite(args.temperature) or args.temperature < 0:
        problems.append(f"--temperature={args.temperature}: expected a finite number >= 0 (0 = greedy)")
    elif args.samples > 1 and args.temperature == 0:
        problems.append(
            f"--samples={args.samples} with --temperature=0: greedy decoding gives {args.samples} identical "
            "completions; set --temperature > 0 for avg@n"
        )
    for flag, path in (("--out", args.out), ("--records", args.records)):
        if path and Path(path).is_dir():
            problems.append(f"{flag}={path!r} is a folder: expected a file")
        elif path:
            parent = Path(path).parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir():
                problems.append(f"{flag}={path!r} lies under {str(parent)!r}, which is a file: expected a folder there")
            elif flag == "--out" and not Path(path).parent.exists():  # --records makes its folders
                problems.append(f"{flag}={path!r}: the folder {str(Path(path).parent)!r} does not exist; make it first")
    outputs = {flag: path for flag, path in (("--out", args.out), ("--records", args.records)) if path}
    if len(outputs) == 2 and Path(args.out).resolve() == Path(args.records).resolve():
        problems.append(f"--out and --records are the same file ({args.out!r}): the records would overwrite the result")
    for flag, path in outputs.items():
        if Path(path).resolve() == Path(args.data).resolve():
            problems.append(f"{flag}={path!r} is the --data file: it would be written over; choose another file")
    try:
        template_kwargs = json.loads(args.chat_template_kwargs)
        if not isinstance(template_kwargs, dict):
            raise ValueError
    except ValueError:
        problems.append(
            f"--chat-template-kwargs={args.chat_template_kwargs!r}: expected a JSON object, e.g. "
            "'{\"enable_thinking\": false}'"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", args.device):
        problems.append(f"--device={args.device!r}: expected auto, cpu, cuda or cuda:N")
    if problems:
        print(f"tropd-ds eval: {problems[0]}", file=sys.stderr)
        return ExitCode.CONFIG

    import torch

    from .config import ConfigError, answer_pattern
    from .data import Columns, answer_text, check_rows, check_template_kwargs, load_rows, prompt_ids
    from .evaluation import (
        avg_at_n,
        extract_answer,
        is_correct,
        resolve_checker,
        unmatched_pattern_warning,
        write_records,
    )

    try:
        base = adapter_base(args.model)  # a PEFT adapter folder (`tropd-ds export --adapter-only`): its base model
        if base is None and not (Path(args.model) / "config.json").is_file():
            raise ConfigError(
                f"{args.model!r} is not a model folder (no config.json) nor a PEFT adapter (no adapter_config.json)"
            )
        refuse_incomplete_export(args.model)
        columns = Columns(
            prompt=args.prompt_column, answer=args.answer_column, messages=args.messages_column, flags=True
        )
        rows = load_rows(args.data, args.split, "--data", columns, "--split")
        if "answer" not in rows.column_names:
            raise ConfigError(
                f"--data {args.data!r} has columns {rows.column_names}: an answer column {args.answer_column!r} "
                "(--answer-column) is required"
            )
        checker = resolve_checker(args.answer_check, "--answer-check")
        pattern = answer_pattern(args.answer_pattern, "--answer-pattern")
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device={args.device}: this machine has no CUDA device; use --device cpu")
    except ConfigError as exc:
        print(f"tropd-ds eval: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base or args.model)
    tok.padding_side = "left"
    n = min(len(rows), args.max_prompts)
    try:  # types, nulls, chat messages without a template, answers: named by row before any generation
        warnings = check_template_kwargs(tok, template_kwargs, "--chat-template-kwargs")
        warnings += check_rows(rows.select(range(n)), tok, "--data", 10**9, "truncate", args.chat_template, True,
                               template_kwargs, columns)  # fmt: skip
    except ConfigError as exc:
        print(f"tropd-ds eval: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    for line in warnings:
        print(f"tropd-ds eval: {line}", file=sys.stderr)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(base or args.model)
    text_config = getattr(model_config, "text_config", None) or model_config
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    longest = max(len(prompt_ids(tok, rows[i]["prompt"], args.chat_template, template_kwargs)) for i in range(n))
    if positions and longest + args.max_new_tokens > positions:
        print(
            f"tropd-ds eval: the longest prompt ({longest} tokens) plus --max-new-tokens={args.max_new_tokens} exceeds "
            f"the model's {positions} positions (max_position_embeddings): lower --max-new-tokens or --max-prompts",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)  # auto: as saved (config.json dtype)
    model = AutoModelForCausalLM.from_pretrained(base or args.model, dtype=dtype, device_map={"": device})
    if base is not None:  # the adapter on its base, merged for generation
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.model).merge_and_unload()
    model.eval()
    # the run's own sampler (rollout.GenerateRollout, as the in-run evaluation uses): softmax(logits / T) and
    # nothing else, never an id past the tokenizer's, whatever the model's generation_config asks of
    # `generate` (a repetition penalty, top-k 50, ...): a model scores here as it scored in its run
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    from .rollout import GenerateRollout, end_token_ids

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sampler = GenerateRollout(model, pad, end_token_ids(tok, model), gather=False, vocab=len(tok))
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, n_samples_per_prompt=args.samples
    )
    records = []
    for start in range(0, n, args.batch_size):
        chunk = [rows[i] for i in range(start, min(n, start + args.batch_size))]
        ids = [prompt_ids(tok, r["prompt"], args.chat_template, template_kwargs) for r in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        batch = sampler.generate(RolloutRequest(input_ids, attention), sampling)
        out = [row[width:][keep[width:].bool()] for row, keep in zip(batch.input_ids, batch.attention_mask)]
        texts = tok.batch_decode(out, skip_special_tokens=True)
        for i, row in enumerate(chunk):
            completions = texts[i * args.samples : (i + 1) * args.samples]
            verdicts = [is_correct(t, row["answer"], checker, pattern) for t in completions]
            prompt = row["prompt"]
            records.append(
                {"index": start + i, "prompt": prompt, "answer": answer_text(row["answer"]), "completions": completions,
                 "correct": verdicts}
            )  # fmt: skip
    accuracy, stderr = avg_at_n([sum(r["correct"]) / len(r["correct"]) for r in records])
    if pattern is not None:
        texts = [t for r in records for t in r["completions"]]
        matched = sum(extract_answer(t, pattern) is not None for t in texts)
        warning = unmatched_pattern_warning(args.answer_pattern, matched, len(texts), texts[0] if texts else None)
        if warning:
            print(f"tropd-ds eval: {warning}", file=sys.stderr)
    result = {
        "model": args.model,
        "data": args.data,
        "eval_accuracy": accuracy,
        "eval_accuracy_stderr": stderr,
        "eval_prompts": len(records),
        "eval_completions": len(records) * args.samples,
        "samples": args.samples,
        "temperature": args.temperature,
        "answer_check": checker,
        "answer_pattern": args.answer_pattern or None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if args.records:
        write_records(Path(args.records), records)
    return 0


def refuse_incomplete_export(folder: str) -> None:
    """A tropd-ds export whose marker says it was interrupted (tropd_export.json, "complete": false) is
    refused: its weights or tokenizer files may be missing or cut short."""
    from .config import ConfigError
    from .ownership import EXPORT_MARK

    mark = Path(folder) / EXPORT_MARK
    if not mark.is_file():
        return
    try:
        info = json.loads(mark.read_text())
        complete = info.get("complete") is True
    except (OSError, ValueError, AttributeError):
        info, complete = {}, False
    if not complete:
        source = info.get("exported_from", "?") if isinstance(info, dict) else "?"
        raise ConfigError(
            f"{folder!r} is an interrupted tropd-ds export ({mark} does not say complete: true; exported from "
            f"{source}): its files may be missing or cut short. Export again (`tropd-ds export --config <the run's "
            "config> --out <folder>`) and evaluate that"
        )


def adapter_base(folder: str) -> str | None:
    """The base model of a PEFT adapter folder (its adapter_config.json), or None for another folder."""
    from .config import ConfigError

    config = Path(folder) / "adapter_config.json"
    if not config.is_file() or (Path(folder) / "config.json").is_file():
        return None
    from .extras import require

    require("peft", f"evaluating the adapter {folder!r}")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(
            f"{folder!r} is a PEFT adapter whose base model {base!r} is not a model folder here: evaluate the merged "
            "export instead, or fix base_model_name_or_path in its adapter_config.json"
        )
    return base


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
    ap.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA run: write the adapter alone (PEFT's adapter_config.json + adapter_model.safetensors)",
    )
    ap.add_argument(
        "--dtype",
        default="run",
        choices=("run", "float32", "bfloat16", "float16"),
        help="the weights' dtype; run (default): the run's student.dtype, as the run's own export",
    )
    args = ap.parse_args(argv)
    from .config import ConfigError, check_outside_models, load_config
    from .export import export_from_checkpoint
    from .ownership import check_export_target

    try:
        if not args.out.strip():
            raise ConfigError("--out is empty: expected a folder for the exported model")
        cfg = load_config(args.config, args.overrides)
        check_outside_models(cfg, "--out", args.out)
        check_export_target(args.out, args.force)
        path = export_from_checkpoint(
            cfg.checkpoint.dir, cfg.student.path, args.out, args.tag, cfg.student.lora, args.adapter_only,
            cfg.student.dtype if args.dtype == "run" else args.dtype,
        )  # fmt: skip
    except ConfigError as exc:
        print(f"tropd-ds export: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except OSError as exc:  # a full disk, a folder that cannot be written: the checkpoint itself is untouched
        print(
            f"tropd-ds export: writing {args.out} failed ({type(exc).__name__}: {exc}); the checkpoint is untouched; "
            f"{args.out} holds a partial export (its tropd_export.json says complete: false): free space and run the "
            "same command again",
            file=sys.stderr,
        )
        return ExitCode.IO
    print(f"exported {path} to {args.out}")
    return 0


def _config(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="tropd-ds config",
        description="Every run-config field with its type, default, accepted values and meaning (--list), or a "
        "config fully resolved: defaults filled in, --set applied, paths absolute (--dump).",
    )
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="every field")
    what.add_argument("--dump", action="store_true", help="the resolved config of --config (and --set)")
    what.add_argument(
        "--presets", action="store_true", help="where the shipped presets, model shapes and DeepSpeed configs are"
    )
    ap.add_argument("--config", default=None, help="YAML or JSON run config (for --dump; default: all defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true", help="JSON instead of text (--list) or YAML (--dump)")
    args = ap.parse_args(argv)
    from .config import ConfigError, describe_fields, load_config, to_dict

    if args.presets:
        from .resources import shipped

        configs, ds_configs = shipped("configs"), shipped("ds_configs")
        print(f"presets (run configs for 70B -> 8B / 72B -> 7B; copy one and set its paths): {configs / 'presets'}")
        for path in sorted((configs / "presets").glob("*.yaml")):
            print(f"  {path}")
        print(f"the demo's config (its models and data are a clone's demo_assets/): {configs / 'demo.yaml'}")
        names = ", ".join(sorted(p.name for p in (configs / "models").iterdir()))
        print(f"model shapes for `tropd-ds plan --student NAME`: {names}")
        print(f"DeepSpeed configs: {ds_configs}")
        for path in sorted(ds_configs.glob("*.json")):
            print(f"  {path}")
        return 0
    if args.list and (args.config is not None or args.overrides):
        print("tropd-ds config: --list describes every field and takes no --config or --set (use --dump for a "
              "resolved config)", file=sys.stderr)  # fmt: skip
        return ExitCode.CONFIG
    if args.list:
        fields = describe_fields()
        if args.json:
            print(json.dumps(fields, indent=1, default=str))
            return 0
        for f in fields:
            print(f"{f['key']}  ({f['type']}, default {json.dumps(f['default'], default=str)}; {f['accepted']})")
            print(f"    {f['meaning']}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"tropd-ds config: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    data = json.loads(json.dumps(to_dict(cfg), default=list))  # tuples as lists
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


COMMANDS = ("train", "serve-teacher", "plan", "eval", "export", "config")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"tropd-ds {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"tropd-ds: unknown command {argv[0]!r}: expected one of {', '.join(COMMANDS)} (tropd-ds --help)",
              file=sys.stderr)  # fmt: skip
        return ExitCode.CONFIG
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    if command == "serve-teacher":
        from .teacher_service import main as serve_main

        return serve_main(rest)
    if command == "plan":
        from .plan import main as plan_main

        return plan_main(rest)
    return {"eval": _eval, "export": _export, "config": _config}[command](rest)


if __name__ == "__main__":
    sys.exit(main())
