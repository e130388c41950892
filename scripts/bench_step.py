#!/usr/bin/env python
"""Step benchmark on tiny models, CPU: where a tropd-ds step's time goes, and the same work in TRL.

Three measurements, each in a fresh process:

1. rollout: one rollout of P prompts x N new tokens from a ZeRO-3 student (one rank), through
   tropd-ds's `GenerateRollout` (gathered once, hooks removed), through DeepSpeed's
   `HybridEngineRollout` with the parameters gathered (hooks active) and layer by layer, against
   plain `model.generate` on the same weights without DeepSpeed, same seed and configuration
   (median of repeats after a warm-up).
2. tropd-ds: the real trainer (`python -m tropd_ds.train`, one process, ZeRO-3 student and offloaded
   teacher), plain OPD (the one-sample reverse KL), P prompts per step, N sampled tokens at most,
   no guidance, no evaluation; per-phase times from its metrics.
3. TRL (when `trl` is installed: `pip install -e ".[bench]"`): `DistillationTrainer` on the same
   models and prompts, P prompts per step, N new tokens at most, reverse KL (beta = 1), one process.

Per-step times come from a short and a long run of each trainer: (wall_long - wall_short) /
(steps_long - steps_short), so start-up, model loading and export cancel.

    python scripts/bench_step.py --out bench_out/step

writes RESULTS.json and RESULTS.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_workspace(work: Path, student_d: int, teacher_d: int) -> None:
    from tropd_ds.demo_models import build_llama
    from tropd_ds.demo_task import build_tokenizer, write_splits

    if (work / "teacher/model.safetensors").is_file():
        return
    tok = build_tokenizer()
    build_llama(work / "student", tok, hidden=student_d, layers=2, heads=4, mlp=2 * student_d, seed=2)
    build_llama(work / "teacher", tok, hidden=teacher_d, layers=2, heads=4, mlp=2 * teacher_d, seed=1)
    write_splits(work / "data", n_train=2000, n_eval=8)


def env(threads: int) -> dict:
    out = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    out.pop("TRITON_INTERPRET", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


# ----------------------------------------------------------------------------- 1. rollout alone


def part_rollout(args) -> dict:
    import socket

    import torch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.runtime.rollout import HybridEngineRollout, RolloutRequest, SamplingConfig
    from transformers import AutoModelForCausalLM

    from tropd_ds import data, rollout
    from tropd_ds.config import OptimConfig, StudentConfig
    from tropd_ds.data import load_rows
    from tropd_ds.demo_task import build_tokenizer
    from tropd_ds.update import student_engine

    deepspeed.init_distributed(dist_backend="gloo")
    work = Path(args.work)
    tok = build_tokenizer()
    cfg = StudentConfig(
        path=str(work / "student"),
        ds_config=str(ROOT / "ds_configs/cpu_student_zero3.json"),
        micro_batch_size=args.prompts,
    )
    plain = AutoModelForCausalLM.from_pretrained(
        work / "student"
    ).eval()  # before the engine: no ZeRO-3 partitioning of it
    engine, _keep = student_engine(cfg, OptimConfig(lr=1e-5, steps=1), len(tok), args.prompts, 1)
    engine.eval()
    rows = load_rows(str(work / "data/train.jsonl"))
    ids, mask = data.left_pad(
        [tok(rows[i]["prompt"])["input_ids"] for i in range(args.prompts)], tok.pad_token_id, "cpu"
    )
    end_ids = rollout.end_token_ids(tok, plain)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    request = RolloutRequest(ids, mask)
    config = rollout.clean_generation_config(sampling, args.new_tokens, tok.pad_token_id, end_ids)

    def plain_generate():
        return plain.generate(ids, attention_mask=mask, generation_config=config)

    ours = rollout.GenerateRollout(engine, tok.pad_token_id, end_ids, gather=True)
    layerwise = rollout.GenerateRollout(engine, tok.pad_token_id, end_ids, gather=False)
    hybrid = HybridEngineRollout(engine, tok)

    def hybrid_gathered():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return hybrid.generate(request, sampling)

    ways = {
        "plain generate (no DeepSpeed)": plain_generate,
        "tropd-ds GenerateRollout, gathered, hook-free": lambda: ours.generate(request, sampling),
        "DeepSpeed HybridEngineRollout, gathered, hooks active": hybrid_gathered,
        "tropd-ds GenerateRollout, layer by layer": lambda: layerwise.generate(request, sampling),
    }
    out = {}
    for name, fn in ways.items():
        times, tokens = [], None
        for i in range(args.repeats + 1):
            torch.manual_seed(1234)
            t0 = time.perf_counter()
            result = fn()
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
            if isinstance(result, torch.Tensor):
                tokens = int(rollout.response_keep(result[:, ids.shape[1] :], end_ids).sum())
                decoded = int(result.shape[1] - ids.shape[1])
            else:
                tokens = int(result.attention_mask[:, ids.shape[1] :].sum())
                decoded = int(result.input_ids.shape[1] - ids.shape[1])
        out[name] = {"median_s": statistics.median(times), "response_tokens": tokens, "decode_steps": decoded}
    base = out["plain generate (no DeepSpeed)"]["median_s"]
    for v in out.values():
        v["vs_plain"] = v["median_s"] / base
    return out


# ----------------------------------------------------------------------------- 2. tropd-ds trainer


def tropd_config(work: Path, args, name: str) -> Path:
    import yaml

    run = work / name
    cfg = {
        "student": {
            "path": str(work / "student"),
            "ds_config": str(ROOT / "ds_configs/cpu_student_zero3.json"),
            "micro_batch_size": args.prompts,
        },
        "teacher": {
            "path": str(work / "teacher"),
            "ds_config": str(ROOT / "ds_configs/cpu_teacher_zero3_offload.json"),
            "micro_batch_size": args.prompts,  # gather_params: the default (auto), as a user gets it
        },
        "data": {"path": str(work / "data/train.jsonl"), "max_prompt_tokens": 32},
        "rollout": {
            "prompts_per_step": args.prompts,
            "samples_per_prompt": 1,
            "max_new_tokens": args.new_tokens,
            "guidance": False,
        },
        "objective": {"name": "opd", "options": {}},
        "optim": {"lr": args.lr},
        "checkpoint": {"dir": str(run / "ckpt"), "every": 0, "resume": False, "export_dir": str(run / "export")},
        "logging": {"dir": str(run / "logs"), "samples_every": 0, "progress": False},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_tropd(work: Path, args, steps: int) -> dict:
    import shutil

    name = f"tropd_{steps}"
    shutil.rmtree(work / name, ignore_errors=True)
    config = tropd_config(work, args, name)
    _, wall = timed_run(
        [sys.executable, "-m", "tropd_ds.train", "--config", str(config), "--set", f"optim.steps={steps}"],
        work,
        args,
        "tropd-ds",
    )
    recs = [json.loads(x) for x in (work / name / "logs/metrics.jsonl").read_text().splitlines()]
    all_steps = [r for r in recs if "loss" in r]
    steps_recs = all_steps[2:] or all_steps  # the first steps build caches
    mean = lambda key: statistics.fmean(r[key] for r in steps_recs)  # noqa: E731
    return {
        "wall_s": wall,
        "steps": steps,
        "rollout_s": mean("time_rollout_s"),
        "teacher_s": mean("time_teacher_s"),
        "update_s": mean("time_update_s"),
        "response_len": mean("response_len"),
    }


# ----------------------------------------------------------------------------- 3. TRL


def part_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    work = Path(args.work)
    tok = AutoTokenizer.from_pretrained(work / "student")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    data = load_dataset("json", data_files=str(work / "data/train.jsonl"), split="train").select_columns(["prompt"])
    config = DistillationConfig(
        output_dir=str(work / f"trl_{args.steps}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_completion_length=args.new_tokens,
        temperature=1.0,
        beta=1.0,  # reverse KL
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=max(args.steps, 1),
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=data, processing_class=tok
    )
    t0 = time.perf_counter()
    trainer.train()
    return {"train_s": time.perf_counter() - t0, "steps": args.steps}


def run_trl(work: Path, args, steps: int) -> dict | None:
    proc, wall = timed_run(
        [sys.executable, __file__, "--part", "trl", "--work", str(work), "--steps", str(steps), *common(args)],
        work,
        args,
        "TRL",
    )
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def timed_run(cmd: list[str], work: Path, args, what: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` in a fresh process; (its result, wall seconds). A failure stops the benchmark with its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env(args.threads), cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{what} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, wall


def common(args) -> list[str]:
    return [
        "--prompts",
        str(args.prompts),
        "--new-tokens",
        str(args.new_tokens),
        "--lr",
        str(args.lr),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]


MIN_STEP_GAP = 20  # long - short steps: fewer leave the difference of two launches inside their noise
MAX_SPREAD = 0.5  # (max - min) / median of the pairs' estimates beyond which no figure is printed


def per_step(short: dict, long: dict) -> float:
    return (long["wall_s"] - short["wall_s"]) / (long["steps"] - short["steps"])


def check_run_lengths(short: int, long: int, pairs: int) -> str | None:
    """Why these run lengths cannot give a per-step time (None when they can)."""
    if short < 1 or long - short < MIN_STEP_GAP:
        return (
            f"--short {short} --long {long}: the long run must be at least {MIN_STEP_GAP} steps longer than the short "
            "one (and the short one at least 1 step): the difference of two launches of a few steps is mostly their "
            "start-up noise (it printed -0.15 s per step once)"
        )
    if pairs < 2:
        return f"--pairs {pairs}: at least 2 (short, long) pairs are needed to report a spread"
    return None


def summarise(estimates: list[float]) -> dict:
    """The pairs' per-step estimates as median, min, max and relative spread; `measured` False (and no figure
    to print) when one is not positive or they spread more than MAX_SPREAD of the median."""
    median = statistics.median(estimates)
    spread = (max(estimates) - min(estimates)) / median if median > 0 else float("inf")
    measured = min(estimates) > 0 and spread <= MAX_SPREAD
    return {"per_step_s": median if measured else None, "estimates_s": estimates, "min_s": min(estimates),
            "max_s": max(estimates), "spread": spread, "measured": measured}  # fmt: skip


def table(result: dict) -> str:
    lines = [
        "## Rollout alone",
        "",
        "| path | median s | vs plain generate | decode steps | response tokens |",
        "|---|---|---|---|---|",
    ]
    for name, v in result["rollout"].items():
        lines.append(
            f"| {name} | {v['median_s']:.4f} | {v['vs_plain']:.2f}x | {v['decode_steps']} | {v['response_tokens']} |"
        )
    t = result["tropd"]
    lines += [
        "",
        "## One training step",
        "",
        "| system | s per step | vs TRL | rollout s | teacher s | update s | response tokens per row |",
        "|---|---|---|---|---|---|---|",
    ]
    trl = result.get("trl")

    def figure(r: dict) -> str:
        if not r["measured"]:
            return f"not measurable (estimates {', '.join(f'{e:.4f}' for e in r['estimates_s'])})"
        return f"{r['per_step_s']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f})"

    both = trl and t["measured"] and trl["measured"]
    ratio = f"{t['per_step_s'] / trl['per_step_s']:.2f}x" if both else "n/a"
    phases = f"{t['rollout_s']:.4f} | {t['teacher_s']:.4f} | {t['update_s']:.4f} | {t['response_len']:.1f}"
    lines.append(
        f"| tropd-ds, its defaults (opd, ZeRO-3 student, offloaded teacher) | {figure(t)} | {ratio} | {phases} |"
    )
    if trl:
        lines.append(f"| TRL DistillationTrainer (beta 1, reverse KL) | {figure(trl)} | 1.00x | | | | |")
    lines += ["", "s per step: the median of the (short, long) pairs, with their range in brackets."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/step")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (one sample each)")
    ap.add_argument("--new-tokens", type=int, default=32, help="most sampled tokens per response")
    ap.add_argument("--short", type=int, default=10, help="steps of the short run")
    ap.add_argument("--long", type=int, default=40, help="steps of the long run")
    ap.add_argument("--repeats", type=int, default=10, help="rollout repeats after one warm-up")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads of each process (2: this machine's cores)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--student-d", type=int, default=64)
    ap.add_argument("--teacher-d", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=3, help="(short, long) run pairs: the median and spread of them")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--part", choices=["rollout", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part == "rollout":
        print(json.dumps(part_rollout(args)))
        return 0
    if args.part == "trl":
        print(json.dumps(part_trl(args)))
        return 0
    problem = check_run_lengths(args.short, args.long, args.pairs)
    if problem:
        print(f"bench_step: {problem}", file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    work = out / "work"
    build_workspace(work, args.student_d, args.teacher_d)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else "",
        "shapes": {
            "prompts": args.prompts,
            "new_tokens": args.new_tokens,
            "student_d": args.student_d,
            "teacher_d": args.teacher_d,
            "layers": 2,
            "threads": args.threads,
        },
    }
    print("rollout ...", flush=True)
    proc, _ = timed_run(
        [sys.executable, __file__, "--part", "rollout", "--work", str(work), *common(args)],
        work,
        args,
        "rollout benchmark",
    )
    result["rollout"] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("tropd-ds ...", flush=True)
    pairs = [(run_tropd(work, args, args.short), run_tropd(work, args, args.long)) for _ in range(args.pairs)]
    long = pairs[-1][1]
    result["tropd"] = {**long, **summarise([per_step(s, lg) for s, lg in pairs]), "settings": "defaults"}
    try:
        import trl  # noqa: F401

        have_trl = not args.skip_trl
    except ImportError:
        have_trl = False
        print("TRL comparison skipped: trl is not installed (pip install 'tropd-ds[bench]')", flush=True)
    if have_trl:
        print("TRL ...", flush=True)
        pairs = [(run_trl(work, args, args.short), run_trl(work, args, args.long)) for _ in range(args.pairs)]
        result["trl"] = {**summarise([per_step(s, lg) for s, lg in pairs]), "runs": pairs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.json").write_text(json.dumps(result, indent=2))
    (out / "RESULTS.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
