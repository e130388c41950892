#!/usr/bin/env python
"""The one GPU check (`make gpu-check`), for a session lent one H100/H200: at most 7 minutes, one command.

Steps, each a subprocess with its own time limit (a share of --budget, 420 s by default; the limits and
the kill grace of every step sum below the budget, see `plan`):

1. env: versions and origins of what the run imports (the carried wheels in /tmp/site, the image's
   torch/triton/pyarrow...), every pin of the carried packages and of setup.py checked against them, the
   run config through the trainer's own pre-flight (tokenizers, the demo data through `datasets`);
2. kernels: `tests/test_kernel_teacher_topk.py`, `_token_terms.py` and `_contract.py` on CUDA (Triton and torch backends
   against the oracle: values, gradients, bf16, odd V, -inf logits, ignored positions), over pytest-xdist workers when installed;
3. bench: `scripts/bench_kernels.py --preset gpu --modes forward,full` within its share (inputs drawn on
   the GPU, the 70B/8B lm_head shapes first, rows written as they complete);
4. train: `python -m tropd_ds.train` on one GPU (NCCL), the demo task, bf16 engines, DeepSpeed's
   `torch_adam` (torch.optim.AdamW: no FusedAdam build), the teacher's parameters offloaded to CPU, a
   few steps, a checkpoint, evaluations and the export. DeepSpeed op builds are refused in that process:
   a run that would JIT-compile an op fails and says which.

What comes back, in --out (at most 8 files; $OUT on the device): gpu_check.json and GPU.md, both rewritten
after every step (and every 15 s during one), a log per step (env.log, kernels.log, bench.log,
train.log) and the run's metrics.jsonl. Everything else (the run's checkpoints, the bench's own files,
caches) stays in --work. When the budget runs out, the running step is stopped (SIGTERM, then SIGKILL),
the steps left are marked "not run", and the two summaries still say what passed.

How to run, from a session whose `status` says it can start a machine: here, `scripts/gpu_wheels.sh`
(wheels of what the image lacks into .whl/), then the device tool's `run` with carry [".whl"],
timeout_s 540 and this one-line command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && if command -v make >/dev/null; then make gpu-check GPU_CHECK_ARGS=--require-gpu; else python3 scripts/gpu_check.py --require-gpu; fi

then copy the returned GPU.md over docs/GPU.md. Without CUDA (or with --rehearse) the same flow runs on
the CPU with the CUDA-only parts made small: a few kernel tests on the torch backend, the smoke bench
preset, two training steps with gloo (`make gpu-check` here does that, in about a minute)."""  # noqa: E501

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.monotonic()  # the budget counts from here, before torch is imported
ROOT = Path(__file__).resolve().parents[1]

DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    ".whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && if command -v make >/dev/null; then make "
    "gpu-check GPU_CHECK_ARGS=--require-gpu; else python3 scripts/gpu_check.py --require-gpu; fi"
)

KERNEL_TESTS = (
    "tests/test_kernel_teacher_topk.py",
    "tests/test_kernel_token_terms.py",
    "tests/test_kernel_contract.py",
)
# In a rehearsal, a sample of the kernel tests: the torch backend in fp32 on one shape, and from hidden states.
REHEARSAL_KERNEL_TESTS = (
    "(fp32 and torch and N37 and V3001 and floorNone and coverNone) or (projected and nobias and fp32 and torch)"
)
# Each step's share of the budget (420 s: env 33.6, kernels 42, bench 147, train 151.2; on an H200 on
# 2026-11-30 the steps took 15.5, 17.7, 60.8 (the kernel bench alone) and 23.5 s). With the kill grace (1% of
# the budget, at most 5 s) after each step, 7% is left over (29.4 s): for starting up (torch's import), the
# last writes, and the margin to the budget.
SHARES = {"env": 0.08, "kernels": 0.10, "bench": 0.35, "train": 0.36}
DEFAULT_BUDGET = 420.0
MAX_RESULT_FILES = 8  # what the device tool brings back from $OUT
LOGS = {name: f"{name}.log" for name in SHARES}
RESULT_FILES = ("gpu_check.json", "GPU.md", *LOGS.values(), "metrics.jsonl")  # 7, and one .tmp at most
TICK_S = 15.0  # how often the summaries are refreshed while a step runs
METRIC_KEYS = (
    "step",
    "loss",
    "trust_fraction",
    "response_len",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "time_rollout_s",
    "time_teacher_s",
    "time_update_s",
    "eval_accuracy",
    "sampled_pad_fraction",
)
# The packages scripts/gpu_wheels.sh carries (the image lacks them, or has an older version): their pins
# are checked against what the device has.
CARRIED = (
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
    "transformers",
)
REPORTED = (
    *CARRIED,
    "torch",
    "triton",
    "numpy",
    "pyarrow",
    "pandas",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
    "accelerate",
    "pyyaml",
    "jinja2",
    "psutil",
    "tqdm",
    "msgpack",
    "ninja",
    "py-cpuinfo",
    "einops",
    "packaging",
    "xxhash",
    "pytest",
    "pytest-xdist",
    "liger-kernel",
    "math-verify",
    "tensorboard",
)


# ----------------------------------------------------------------------------------------------- the plan


def plan(budget: float) -> dict:
    """Each step's time limit, the grace between SIGTERM and SIGKILL, and what is left for the rest: the
    limits plus a grace per step sum to less than the budget."""
    grace = math.floor(min(5.0, 0.01 * budget) * 100) / 100
    timeouts = {name: math.floor(share * budget * 10) / 10 for name, share in SHARES.items()}  # never rounded up
    used = sum(timeouts.values()) + grace * len(timeouts)
    return dict(budget_s=budget, timeouts_s=timeouts, grace_s=grace, reserve_s=round(budget - used, 2))


def run_config(work: Path, steps: int, rehearsal: bool = False) -> Path:
    """The short run's config (the demo task, bf16 engines, torch_adam, the teacher offloaded to CPU) and
    its student DeepSpeed config, under `work`; everything the run writes goes to work/run."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    student_ds = json.loads((ROOT / "ds_configs/student_zero3_bf16.json").read_text())
    # torch.optim.AdamW through DeepSpeed's own optimizer section: FusedAdam would be compiled with nvcc
    # on first use (the wheel carries no built op); torch_adam builds nothing.
    student_ds["optimizer"]["params"].update(lr="auto", torch_adam=True)
    student_ds.pop("tensorboard", None)  # metrics.jsonl is the record; no event files to bring back
    (work / "student_ds.json").write_text(json.dumps(student_ds, indent=1))
    cfg["student"].update(
        ds_config=str(work / "student_ds.json"), dtype="bfloat16", path=str(ROOT / "demo_assets/student")
    )
    cfg["teacher"].update(
        ds_config=str(ROOT / "ds_configs/teacher_zero3_offload_cpu.json"),
        dtype="bfloat16",
        path=str(ROOT / "demo_assets/teacher"),
        gather_params=False,  # the offloaded teacher streams layer by layer, as a 70B one would
    )
    cfg["data"].update(path=str(ROOT / "demo_assets/train.jsonl"), eval_path=str(ROOT / "demo_assets/eval.jsonl"))
    cfg["optim"].update(steps=steps, warmup_steps=min(2, steps - 1))
    run = work / "run"
    cfg["checkpoint"] = {
        "dir": str(run / "ckpt"),
        "every": steps,
        "keep_last": 1,
        "export_dir": str(run / "export"),
        "resume": False,
    }
    cfg["logging"] = {"dir": str(run / "logs"), "samples_every": max(1, steps // 2), "progress": False}
    cfg["eval"].update(every=0, max_prompts=8 if rehearsal else 64)  # evaluated at the start and the end
    if rehearsal:
        cfg["rollout"].update(prompts_per_step=8)
        cfg["student"]["micro_batch_size"] = cfg["teacher"]["micro_batch_size"] = 8
    path = work / "gpu_run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------- steps run in subprocesses


def dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unmet(requirements: list[str], who: str) -> list[str]:
    """The requirements (PEP 508 strings; extras' ones skipped) that the installed versions miss."""
    from packaging.requirements import Requirement

    bad = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = dist_version(req.name)
        if have is None:
            bad.append(f"{who} needs {req}: not installed")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append(f"{who} needs {req}: {have} installed")
    return bad


def setup_requirements() -> list[str]:
    """install_requires of setup.py (tropd-ds itself is not installed on the device: it runs from the tree)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return list(ast.literal_eval(node.value))
    return []


def env_step(out_json: Path, config: Path) -> int:
    """Step 1 (a subprocess): versions, pins, the accelerator DeepSpeed picks, and the run config through the
    trainer's pre-flight; writes out_json. Exit 1 when something the run needs fails to import or load."""
    from importlib import metadata

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "errors": [], "warnings": []}
    info["packages"] = {}
    for name in REPORTED:
        version = dist_version(name)
        if version is None:
            continue
        try:
            where = str(metadata.distribution(name).locate_file(""))
        except Exception:  # noqa: BLE001 - only a label
            where = "?"
        info["packages"][name] = f"{version} ({where})"
    for name in CARRIED:
        if dist_version(name) is not None:
            info["warnings"] += unmet(metadata.requires(name) or [], name)
    info["warnings"] += unmet(setup_requirements(), "tropd-ds (setup.py)")
    print(json.dumps(info["packages"], indent=1), flush=True)
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device"] = torch.cuda.get_device_name(0)
            info["capability"] = list(torch.cuda.get_device_capability(0))
            info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["bf16"] = torch.cuda.is_bf16_supported()
        out_json.write_text(json.dumps(info, indent=1, default=str))  # the device's facts survive a cut-off step
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        info["deepspeed_accelerator"] = accelerator._name
        # the CPU shared-memory op is the one DeepSpeed builds at init_distributed on a CPU machine; the
        # CUDA accelerator has no such builder, so NCCL start-up builds nothing
        info["deepspeed_shm_builder"] = accelerator.create_op_builder("ShareMemCommBuilder") is not None
        info["deepspeed_version"] = deepspeed.__version__
        out_json.write_text(json.dumps(info, indent=1, default=str))
        from tropd_ds.config import load_config
        from tropd_ds.preflight import validate_before_engines

        cfg = load_config(str(config))
        prepared = validate_before_engines(cfg, world=1)
        info["train_rows"] = len(prepared.train_rows)
        info["eval_rows"] = None if prepared.eval_rows is None else len(prepared.eval_rows)
        ds = json.loads(Path(cfg.student.ds_config).read_text())
        info["student_optimizer"] = ds.get("optimizer")
        if not ds.get("optimizer", {}).get("params", {}).get("torch_adam"):
            info["errors"].append("the student's DeepSpeed optimizer is not torch_adam: FusedAdam would be built")
    except Exception as exc:  # noqa: BLE001 - reported, and the step fails
        import traceback

        traceback.print_exc()
        info["errors"].append(f"{type(exc).__name__}: {exc}"[:1000])
    for line in info["warnings"]:
        print(f"[env] warning: {line}", flush=True)
    for line in info["errors"]:
        print(f"[env] error: {line}", flush=True)
    out_json.write_text(json.dumps(info, indent=1, default=str))
    return 1 if info["errors"] else 0


def guarded_train(argv: list[str]) -> None:
    """Step 4 (a subprocess): `python -m tropd_ds.train ARGV` with DeepSpeed's just-in-time op builds refused
    (one that would start fails the run, naming the op), then exits as the trainer does."""
    import runpy

    import torch
    from deepspeed.ops.op_builder import builder

    def refuse(self, verbose=True):  # noqa: ARG001 - OpBuilder.jit_load's signature
        message = (
            f"[gpu-check] refused: DeepSpeed asked to JIT-build its {self.name!r} op (a compiler at run time); "
            "the GPU check allows no op build"
        )
        print(message, flush=True)
        raise RuntimeError(message)

    builder.OpBuilder.jit_load = refuse
    if not torch.cuda.is_available():  # the rehearsal: skip the CPU shm op, as CUDA's accelerator has none
        import importlib

        # by its module's name: `import deepspeed.comm.torch as m` would give the torch that deepspeed.comm holds
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    sys.argv = ["tropd_ds.train", *argv]
    runpy.run_module("tropd_ds.train", run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------------------------------------- the check


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tail(path: Path, chars: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pytest_counts(log: Path) -> dict:
    """Per-test outcomes from a `pytest -v` log, complete or cut short."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    counts: dict = {}
    failed = []
    for line in text.splitlines():
        m = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if m and "::" in line and not line.startswith(("FAILED ", "ERROR ")):
            counts[m.group(1).lower()] = counts.get(m.group(1).lower(), 0) + 1
            if m.group(1) in ("FAILED", "ERROR") and len(failed) < 20:
                failed.append(next((w for w in line.split() if "::" in w), line)[:200])
    final = re.findall(r"^=+ (.*(?:passed|failed|error|no tests ran).*) in [0-9.]+s.*=+$", text, re.M)
    return dict(counts=counts, failed=failed, pytest_summary=final[-1] if final else None)


class Check:
    def __init__(self, args, rehearsal: bool, device: str):
        self.args, self.rehearsal = args, rehearsal
        self.out, self.work = args.out, args.work
        self.deadline = T0 + args.budget
        self.plan = plan(args.budget)
        self.proc: subprocess.Popen | None = None
        self.interrupted: str | None = None
        self.result = {
            "mode": "rehearsal (no CUDA: the CUDA-only parts made small, on the CPU)" if rehearsal else "gpu",
            "status": "running",
            "device": device,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": platform.platform(),
            "plan": self.plan,
            "elapsed_s": 0.0,
            "steps": {name: {"status": "pending"} for name in SHARES},
            "writes": [],
        }
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")) if p
            ),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",  # nothing can be fetched on the device; the run reads local files only
            "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(self.work / "hf_datasets"),
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.env.pop("TRITON_INTERPRET", None)  # the kernel tests' conftest sets it again where there is no CUDA

    # -- writing

    def write(self, after: str | None = None) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - T0, 1)
        if after is not None:
            files = sorted(p.name for p in self.out.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
            self.result["writes"].append({"after": after, "elapsed_s": self.result["elapsed_s"], "files": files})
        write_atomic(self.out / "gpu_check.json", json.dumps(self.result, indent=1, default=str))
        write_atomic(self.out / "GPU.md", summary(self.result))

    # -- one step

    def limit(self, name: str) -> float:
        """The step's time limit if it started now: its share, or less when the budget is nearly spent."""
        left = self.deadline - time.monotonic() - self.plan["grace_s"] - 0.02 * self.args.budget
        return min(self.plan["timeouts_s"][name], left)

    def run_step(self, name: str, cmd: list[str], refresh=None, extra_env: dict | None = None) -> None:
        step = self.result["steps"][name]
        timeout = self.limit(name)
        step.update(limit_s=round(timeout, 1), log=LOGS[name], command=" ".join(cmd))
        if self.interrupted or timeout < 0.5:
            step["status"] = "not run: " + (self.interrupted or "budget spent")
            self.write(after=name)
            return
        print(f"[gpu-check] {name} (limit {timeout:.0f} s): {' '.join(cmd)}", flush=True)
        step["status"] = "running"
        self.write()
        log = self.out / LOGS[name]
        t0 = time.monotonic()
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**self.env, **(extra_env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            code, next_tick = None, t0 + TICK_S
            while code is None:
                try:
                    wake = min(next_tick, t0 + timeout, time.monotonic() + 1.0)  # a signal is seen within 1 s
                    code = self.proc.wait(timeout=max(0.05, wake - time.monotonic()))
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    if self.interrupted or now >= t0 + timeout:
                        step["status"] = "interrupted" if self.interrupted else "timeout"
                        kill_group(self.proc, signal.SIGTERM)
                        try:
                            code = self.proc.wait(timeout=self.plan["grace_s"])
                        except subprocess.TimeoutExpired:
                            kill_group(self.proc, signal.SIGKILL)
                            code = self.proc.wait()
                    elif now >= next_tick:
                        next_tick = now + TICK_S
                        step["seconds"] = round(now - t0, 1)
                        if refresh is not None:
                            refresh(step)
                        self.write()
            kill_group(self.proc, signal.SIGKILL)  # stragglers of the step (xdist workers, a launcher's ranks)
            self.proc = None
        step["seconds"] = round(time.monotonic() - t0, 1)
        step["exit"] = code
        if step["status"] == "running":
            step["status"] = "passed" if code == 0 else "failed"
        step["log_tail"] = tail(log)
        if refresh is not None:
            refresh(step)
        skipped = step.get("summary", {}).get("steps_skipped")
        if step["status"] == "passed" and skipped:  # a run that skipped steps did not train as asked
            step["status"] = f"failed: steps {skipped} skipped for non-finite values"
        print(f"[gpu-check] {name}: {step['status']} (exit {code}) in {step['seconds']:.0f} s", flush=True)
        self.write(after=name)

    # -- the four steps

    def env_step(self, config: Path) -> None:
        env_json = self.work / "env.json"

        def refresh(step):
            if env_json.is_file():
                info = json.loads(env_json.read_text())
                step["summary"] = info
                for key in ("device", "torch", "cuda"):
                    if info.get(key):
                        self.result[key] = info[key]

        self.run_step("env", [sys.executable, __file__, "--_env", str(env_json), str(config)], refresh)

    def kernels_step(self) -> None:
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=short", "--maxfail=25"]
        if self.rehearsal:  # the Triton interpreter is slow on a CPU: a sample of the torch backend's cases
            cmd += ["-k", REHEARSAL_KERNEL_TESTS]
        else:
            import importlib.util

            if importlib.util.find_spec("xdist") is not None:  # compiling Triton kernels dominates: spread it
                cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 4) // 2)))]
        log = self.out / LOGS["kernels"]
        self.run_step("kernels", cmd + list(KERNEL_TESTS), lambda step: step.update(summary=pytest_counts(log)))

    def bench_step(self) -> None:
        bench = self.work / "bench"
        shutil.rmtree(bench, ignore_errors=True)
        # the kernel bench stops starting measurements this long before the step's limit (start-up, the last
        # case, then the rollout's decode bench)
        margin = (10.0 if self.rehearsal else BENCH_MARGIN_S) + (0.0 if self.rehearsal else ROLLOUT_BENCH_S)
        budget = max(1.0, self.limit("bench") - margin)
        preset = ["--preset", "gpu"]
        if self.rehearsal:  # the smoke preset's lm_head case; no re-exec for the allocator setting
            preset = ["--preset", "smoke", "--repeats", "1", "--only", "from_hidden"]
        kernels = [sys.executable, "scripts/bench_kernels.py", *preset, "--modes", "forward,full"]
        kernels += ["--budget-s", f"{budget:.0f}", "--out", str(bench)]
        rollout = [sys.executable, "scripts/bench_rollout.py", *(ROLLOUT_REHEARSAL if self.rehearsal else ROLLOUT_GPU)]
        rollout += ["--out", str(bench / "rollout")]
        cmd = [sys.executable, __file__, "--_bench", json.dumps([kernels, rollout])]

        def refresh(step):
            results = bench / "RESULTS.json"
            if results.is_file():
                data = json.loads(results.read_text())
                table = (bench / "RESULTS.md").read_text() if (bench / "RESULTS.md").is_file() else ""
                step["summary"] = dict(
                    status=data.get("status"),
                    rows=data["rows"],
                    not_run=len(data.get("not_run", [])),
                    errors=sum("error" in r for r in data["rows"]),
                    table=table,
                )
            decode = bench / "rollout" / "RESULTS.json"
            if decode.is_file() and "summary" in step:
                step["summary"]["rollout"] = json.loads(decode.read_text())
                step["summary"]["rollout_table"] = (bench / "rollout" / "RESULTS.md").read_text()

        self.run_step("bench", cmd, refresh, extra_env={"MALLOC_MMAP_THRESHOLD_": "65536"} if self.rehearsal else None)

    def train_step(self, config: Path) -> None:
        run = self.work / "run"
        shutil.rmtree(run, ignore_errors=True)
        metrics = run / "logs/metrics.jsonl"
        log = self.out / LOGS["train"]

        def refresh(step):
            records = []
            if metrics.is_file():
                shutil.copyfile(metrics, self.out / "metrics.jsonl.tmp")
                os.replace(self.out / "metrics.jsonl.tmp", self.out / "metrics.jsonl")
                for line in metrics.read_text().splitlines():
                    try:
                        records.append(json.loads(line))
                    except ValueError:  # a line cut by the kill
                        pass
            text = log.read_text(errors="replace") if log.is_file() else ""
            step["summary"] = dict(
                steps_done=max((r.get("step", 0) for r in records if "loss" in r), default=0),
                steps_planned=self.args.steps,
                steps_skipped=[r["step"] for r in records if r.get("skipped")],
                metrics=[{k: r[k] for k in METRIC_KEYS if k in r} for r in records],
                exported="exported the student to" in text,
                jit_builds_refused=sorted(set(re.findall(r"JIT-build its '([^']+)' op", text))),
            )

        self.run_step("train", [sys.executable, __file__, "--_train", "--config", str(config)], refresh)

    def finish(self) -> int:
        steps = self.result["steps"]
        statuses = [s["status"] for s in steps.values()]
        if self.interrupted:
            self.result["status"] = f"interrupted ({self.interrupted})"
        elif all(s in ("passed", "skipped") for s in statuses):
            self.result["status"] = "passed"
        elif any(s == "timeout" or s.startswith("not run") for s in statuses):
            self.result["status"] = "budget spent: " + ", ".join(
                f"{n} {s['status']}" for n, s in steps.items() if s["status"] not in ("passed", "skipped")
            )
        else:
            failed = [n for n, s in steps.items() if s["status"].startswith("failed")]
            self.result["status"] = "failed: " + ", ".join(failed)
        self.write(after="end")
        print(summary(self.result), flush=True)
        return 0 if self.result["status"] == "passed" else 1


def md_table(rows: list[dict], keys: tuple) -> list[str]:
    keys = [k for k in keys if any(k in r for r in rows)]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        out.append("| " + " | ".join(cells) + " |")
    return out


def summary(result: dict) -> str:
    """GPU.md: the results so far, then how to run the check (the page that replaces docs/GPU.md)."""
    plan_ = result["plan"]
    lines = [
        "# GPU check",
        "",
        "## Results",
        "",
        f"Mode: {result['mode']}. Device: {result.get('device')}; torch {result.get('torch')}, CUDA "
        f"{result.get('cuda')}; {result['when']}.",
        f"Status: **{result['status']}** after {result['elapsed_s']} s of a {plan_['budget_s']:.0f} s budget.",
        f"Command: `{result['command']}`.",
        "",
        "| step | status | exit | seconds | limit s |",
        "|---|---|---|---|---|",
    ]
    steps = result["steps"]
    for name, s in steps.items():
        lines.append(
            f"| {name} | {s['status']} | {s.get('exit', '')} | {s.get('seconds', '')} | {s.get('limit_s', '')} |"
        )
    env = steps["env"].get("summary")
    if env:
        lines += ["", "### Environment", ""]
        for key in ("device", "capability", "device_memory_gib", "deepspeed_accelerator", "deepspeed_shm_builder"):
            if key in env:
                lines.append(f"- {key}: {env[key]}")
        lines += [f"- {name} {where}" for name, where in env.get("packages", {}).items()]
        lines += [f"- warning: {w}" for w in env.get("warnings", [])]
        lines += [f"- **error**: {e}" for e in env.get("errors", [])]
    kernels = steps["kernels"].get("summary")
    if kernels:
        lines += ["", "### Kernel tests", "", f"Outcomes: {kernels['counts']}; pytest: {kernels['pytest_summary']}."]
        lines += [f"- failed: `{t}`" for t in kernels["failed"]]
    bench = steps["bench"].get("summary")
    if bench:
        lines += ["", f"### Kernel benchmarks ({bench['status']}; {bench['not_run']} measurements not run)", ""]
        lines.append(bench["table"])
        if bench.get("rollout_table"):
            lines += ["", "### Rollout decode", "", bench["rollout_table"]]
    train = steps["train"].get("summary")
    if train:
        lines += [
            "",
            "### Short run (demo task, bf16 engines, torch_adam, teacher offloaded to CPU)",
            "",
            f"{train['steps_done']} of {train['steps_planned']} steps; exported: {train['exported']}; "
            f"DeepSpeed op builds refused: {train['jit_builds_refused'] or 'none'}.",
            "",
        ]
        lines += md_table(train["metrics"], METRIC_KEYS)
    for name, s in steps.items():
        if s["status"] not in ("passed", "pending", "running", "skipped") and s.get("log_tail"):
            lines += ["", f"### {name}: end of {s['log']}", "", "```", s["log_tail"][-1500:], "```"]
    lines += ["", how_to_run(plan_["budget_s"])]
    return "\n".join(lines) + "\n"


HOW_TO_RUN = """## How to run

First the device tool's `status` (free): a session whose `can_start_another` is false has no GPU. Then,
here (the wheels of what the device image lacks, into .whl/, ignored by git; it prints their sizes and
fails past the 64 MiB that may travel with the working tree):

```bash
scripts/gpu_wheels.sh
```

Always run it right before the device call, even when `.whl/` exists: it starts afresh (`rm -rf .whl`), and a
folder left by an earlier session may lack wheels the check needs (pydantic, without which DeepSpeed does
not import). Give the machine back (`give_back`) as soon as the call returns. On an H200 (2026-11-30) the check
took 122 to 137 s and the whole call, the machine's start included, under 3 of the 15 device minutes: room
for a second run after a fix, not for idling.

Then one call of the device tool's `run`, with `carry: [".whl"]`, `timeout_s: 540` and this command:

```bash
{command}
```

It installs the wheels into /tmp/site (`--no-deps`: the image's torch, triton, pyarrow... stay) and runs
`make gpu-check` (`scripts/gpu_check.py`; straight, if the image has no `make`). The check has a
{budget:.0f} s budget; each step is a subprocess with its own limit, stopped with SIGTERM then
SIGKILL after a grace of {grace:g} s:

{table}

The limits and graces sum to {used:g} s; {reserve:g} s are left for start-up and the last writes.

Nothing is compiled with nvcc: `torch_adam` makes DeepSpeed use torch.optim.AdamW (no FusedAdam
build), CUDA's DeepSpeed accelerator has no shared-memory comm op to build, no quantizer, NVMe/AIO or
native pinned-memory option is on, and the training process refuses any DeepSpeed op build (a refused
build fails the step and is named in the results). Triton compiles its own kernels, as in any run.

Results, in $OUT (at most 8 files come back; the check leaves 7): gpu_check.json and GPU.md (rewritten
after every step and every 15 s during one: a run cut short still says what passed; copy GPU.md over
docs/GPU.md), env.log, kernels.log, bench.log, train.log and the run's metrics.jsonl. The run's
checkpoints, the bench's own files and caches stay in /tmp/tropd_gpu_check.

Here, without CUDA, `make gpu-check` rehearses the same flow on the CPU with the CUDA-only parts made
small (5 kernel tests on the torch backend, the smoke bench case, 2 training steps with gloo; about a
minute on 2 cores); tests/test_gpu_check.py runs it, and a run cut short by a tiny budget."""
STEP_WHAT = {
    "env": "versions and origins, the pins of the carried wheels and of setup.py, the run config through the "
    "trainer's pre-flight (tokenizers, the demo data through `datasets`)",
    "kernels": "`tests/test_kernel_teacher_topk.py`, `_token_terms.py` and `_contract.py` on CUDA (Triton and "
    "torch backends "
    "against the oracle), over "
    "pytest-xdist workers",
    "bench": "`bench_kernels.py --preset gpu --modes forward,full --budget-s {bench_budget:.0f}`: inputs drawn on "
    "the GPU, the 70B/8B lm_head shapes first, rows written as they complete; then `bench_rollout.py --preset gpu` "
    "(the decode loop's settings, the host's ms per layer)",
    "train": "`tropd_ds.train` on one GPU: NCCL, bf16 engines, DeepSpeed's `torch_adam`, the teacher offloaded "
    "to CPU, 10 steps, evaluations at steps 0 and 10, a checkpoint and the export",
}
BENCH_MARGIN_S = 20.0  # the bench starts no measurement this close to its step's limit (start-up, the last case)
# The rollout's decode bench after the kernels' (scripts/bench_rollout.py: DynamicCache or the preallocated
# cache, a sync every token or every 16; the host's ms per layer the planner assumes): 8 of Llama-3.1-8B's
# layers, 16 rows of 1024 + 256 tokens, 2 repeats, about 25 s on an H100-class GPU; a tiny model when rehearsing.
ROLLOUT_BENCH_S = 35.0
ROLLOUT_GPU = ["--preset", "gpu", "--new-tokens", "256", "--repeats", "2"]
ROLLOUT_REHEARSAL = ["--preset", "cpu", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--vocab", "256",
                     "--rows", "2", "--prompt", "16", "--new-tokens", "8", "--repeats", "1"]  # fmt: skip


def bench_both(commands: list[list[str]]) -> int:
    """The bench step's two benchmarks in turn (the kernels', then the rollout's); the first failure's code."""
    code = 0
    for cmd in commands:
        print(f"[gpu-check bench] {' '.join(cmd)}", flush=True)
        code = code or subprocess.call(cmd, cwd=ROOT)
    return code


def how_to_run(budget: float = DEFAULT_BUDGET) -> str:
    """The page's "How to run" section (in docs/GPU.md and in every GPU.md the check writes)."""
    p = plan(budget)
    rows = ["| step | limit | what |", "|---|---|---|"]
    for name, limit in p["timeouts_s"].items():
        what = STEP_WHAT[name].format(bench_budget=limit - BENCH_MARGIN_S - ROLLOUT_BENCH_S)
        rows.append(f"| {name} | {limit:g} s | {what} |")
    return HOW_TO_RUN.format(
        command=DEVICE_COMMAND,
        budget=budget,
        grace=p["grace_s"],
        table="\n".join(rows),
        used=round(budget - p["reserve_s"], 1),
        reserve=p["reserve_s"],
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_env"]:
        return env_step(Path(argv[1]), Path(argv[2]))
    if argv[:1] == ["--_bench"]:
        return bench_both(json.loads(argv[1]))
    if argv[:1] == ["--_train"]:
        guarded_train(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_out"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tropd_gpu_check")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole check")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 10; 2 when rehearsing)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: env,kernels,bench,train")
    ap.add_argument("--rehearse", action="store_true", help="the CPU rehearsal even where CUDA is available")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 instead of rehearsing without CUDA")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SHARES):
        ap.error(f"--skip {args.skip!r}: expected steps among {', '.join(SHARES)}")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.require_gpu:
        print("gpu-check: no CUDA device here (--require-gpu)", file=sys.stderr)
        return 2
    rehearsal = args.rehearse or not cuda
    if args.steps is None:
        args.steps = 2 if rehearsal else 10
    args.out, args.work = args.out.resolve(), args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:  # a previous check's results in the same folder
        for path in (args.out / name, args.out / f"{name}.tmp"):
            path.unlink(missing_ok=True)
    if args.work.is_dir() and any(args.work.iterdir()) and not (args.work / "gpu_run.yaml").is_file():
        ap.error(f"--work {args.work}: not empty and not a previous check's folder; it would be wiped")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    # the GPU's name comes from the env step: no CUDA context in this process, which only waits
    check = Check(args, rehearsal, "cuda (named by the env step)" if not rehearsal else "cpu")
    check.result["torch"] = torch.__version__

    def on_signal(signum, frame):  # noqa: ARG001
        check.interrupted = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    config = run_config(args.work, args.steps, rehearsal)
    for name in skip:
        check.result["steps"][name]["status"] = "skipped"
    check.write(after="start")
    if rehearsal:
        check.env["CUDA_VISIBLE_DEVICES"] = ""  # --rehearse on a GPU machine: the children see no GPU either
    for name, run in (
        ("env", lambda: check.env_step(config)),
        ("kernels", check.kernels_step),
        ("bench", check.bench_step),
        ("train", lambda: check.train_step(config)),
    ):
        if name not in skip:
            run()
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
