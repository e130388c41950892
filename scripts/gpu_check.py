#!/usr/bin/env python
"""The one GPU check (`make gpu-check`), for a session lent a GPU: at most about 8 minutes on one H100/H200.

1. kernels: `tests/test_kernel_*.py` on CUDA (the Triton and torch backends against the naive oracle:
   values, gradients, bf16, odd V, -inf logits, ignored positions);
2. benchmarks: `scripts/bench_kernels.py --preset gpu` at the 70B/7B shapes (oracle, torch, Triton,
   Liger when installed, with the H100 floor column);
3. a short real run: `python -m tropd_ds.train` on one GPU (NCCL), the demo task with bf16 engines
   (`ds_configs/student_zero3_bf16.json`, DeepSpeed's fused AdamW) and the teacher's parameters
   offloaded to CPU (`ds_configs/teacher_zero3_offload_cpu.json`), 12 steps with an evaluation.

Results: OUT/gpu_check.json and OUT/GPU.md (copy it to docs/GPU.md), plus each step's log.

The device image has torch, triton and transformers but not DeepSpeed or datasets: fetch their wheels
here with `scripts/gpu_wheels.sh` (into .whl/, ignored by git), carry `.whl`, and start the command with
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

KERNEL_TESTS = (
    "tests/test_kernel_teacher_topk.py",
    "tests/test_kernel_token_terms.py",
    "tests/test_kernel_contract.py",
)

ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], out: Path, timeout: int, env: dict) -> dict:
    print(f"[gpu-check] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = time.perf_counter() - t0
    tail = log.read_text()[-2500:]
    print(f"[gpu-check] {name}: exit {code} in {seconds:.0f} s\n{tail[-800:]}", flush=True)
    return {"exit": code, "seconds": round(seconds, 1), "log_tail": tail}


def run_config(out: Path, steps: int) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    student_ds = json.loads((ROOT / "ds_configs/student_zero3_bf16.json").read_text())
    student_ds["optimizer"]["params"]["lr"] = "auto"  # the run config's optim.lr decides
    student_ds["tensorboard"]["output_path"] = str(out / "run/tensorboard")
    (out / "student_ds.json").write_text(json.dumps(student_ds, indent=1))
    cfg["student"].update(
        ds_config=str(out / "student_ds.json"), dtype="bfloat16", path=str(ROOT / "demo_assets/student")
    )
    cfg["teacher"].update(
        ds_config=str(ROOT / "ds_configs/teacher_zero3_offload_cpu.json"),
        dtype="bfloat16",
        path=str(ROOT / "demo_assets/teacher"),
    )
    cfg["teacher"]["gather_params"] = False  # the offloaded teacher streams layer by layer, as a 70B one would
    cfg["data"].update(path=str(ROOT / "demo_assets/train.jsonl"), eval_path=str(ROOT / "demo_assets/eval.jsonl"))
    cfg["optim"].update(steps=steps, warmup_steps=2)
    cfg["checkpoint"] = {
        "dir": str(out / "run/ckpt"),
        "every": steps,
        "keep_last": 1,
        "export_dir": str(out / "run/export"),
        "resume": False,
    }
    cfg["logging"] = {"dir": str(out / "run/logs"), "samples_every": 4, "progress": False}
    cfg["eval"] = {"every": 0, "max_prompts": 64, "max_new_tokens": 36}
    path = out / "gpu_run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def summary(result: dict) -> str:
    lines = [
        "# GPU check",
        "",
        f"Device: {result['device']}; torch {result['torch']}; {result['when']}.",
        f"Command: `{result['command']}`.",
        "",
        "| step | exit | seconds |",
        "|---|---|---|",
    ]
    for name in ("kernels", "bench", "train"):
        if name in result:
            lines.append(f"| {name} | {result[name]['exit']} | {result[name]['seconds']} |")
    bench = result.get("bench_table")
    if bench:
        lines += ["", "## Kernel benchmarks (bench_kernels.py --preset gpu)", "", bench]
    train = result.get("train_metrics")
    if train:
        lines += [
            "",
            "## Short run (demo task, bf16 engines, NCCL, teacher offloaded to CPU)",
            "",
            "```",
            json.dumps(train, indent=1)[:3000],
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: kernels,bench,train")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TRITON_INTERPRET", None)
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": platform.platform(),
    }
    if "kernels" not in skip:
        result["kernels"] = step(
            "kernels",
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
            out,
            180,
            env,
        )
    if "bench" not in skip:
        result["bench"] = step(
            "bench",
            [sys.executable, "scripts/bench_kernels.py", "--preset", "gpu", "--out", str(out / "bench")],
            out,
            240,
            env,
        )
        table = out / "bench/RESULTS.md"
        result["bench_table"] = table.read_text() if table.is_file() else ""
    if "train" not in skip:
        config = run_config(out, args.steps)
        result["train"] = step(
            "train", [sys.executable, "-m", "tropd_ds.train", "--config", str(config)], out, 300, env
        )
        metrics = out / "run/logs/metrics.jsonl"
        if metrics.is_file():
            recs = [json.loads(x) for x in metrics.read_text().splitlines()]
            keep = (
                "step",
                "loss",
                "trust_fraction",
                "response_len",
                "grad_norm",
                "time_rollout_s",
                "time_teacher_s",
                "time_update_s",
                "eval_accuracy",
                "sampled_pad_fraction",
            )
            result["train_metrics"] = [{k: r[k] for k in keep if k in r} for r in recs]
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "GPU.md").write_text(summary(result))
    print(summary(result), flush=True)
    return 0 if all(result[k]["exit"] == 0 for k in ("kernels", "bench", "train") if k in result) else 1


if __name__ == "__main__":
    sys.exit(main())
