#!/usr/bin/env python
"""Kernel microbenchmarks: time (median and 20-80% quantiles of repeats after warm-up) and peak working memory.

Implementations: the naive oracle, the torch backend, the Triton backend (CUDA only) and, when
liger-kernel is installed and a GPU is present, Liger's fused linear JSD (its closest operation).
Operations: `token_terms` (logits input), `teacher_topk` (forward only) and `token_terms_from_hidden`
(d/d hidden and d/d weight). Modes (--modes): `forward`, `backward` (the backward of one forward, kept
with retain_graph) and `full` (forward then backward). On a GPU the times come from
`triton.testing.do_bench`; on a CPU from perf_counter around each repeat.

Peak working memory is the peak beyond the inputs and the gradient buffers that backward must
return. On CUDA it comes from torch.cuda.max_memory_allocated; on CPU from the process's peak
resident set size (VmHWM), reset before each measurement through /proc/self/clear_refs.

    python scripts/bench_kernels.py --preset cpu --out bench_out/cpu
    python scripts/bench_kernels.py --preset gpu --out bench_out/gpu
    python scripts/bench_kernels.py --preset cpu --modes full --only from_hidden --out bench_out/cpu_full
    python scripts/bench_kernels.py --preset gpu --modes forward,full --budget-s 100 --out bench_out/gpu

writes RESULTS.json and RESULTS.md under --out, both rewritten after every measurement (a run that is cut
off still leaves every row it finished). Inputs are drawn on the device that runs the case (no CPU draws of
[N, V] logits or [V, d] weights). With --budget-s, no new measurement starts once the next one would end
past the budget (estimated from the slowest so far); the cases not run are listed under "not_run". The gpu
preset lists the 70B -> 8B (Llama) and 72B -> 7B (Qwen) lm_head shapes first, so a budget cuts the least
telling cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import tropd_kernels as tk

PRESETS = {
    # (op, N, V, k, d, dtype)
    "cpu": [
        ("token_terms", 1024, 32000, 64, 0, "float32"),
        ("token_terms", 4096, 32000, 64, 0, "float32"),
        ("teacher_topk", 4096, 32000, 64, 0, "float32"),
        ("token_terms_from_hidden", 1024, 32000, 64, 256, "float32"),
        ("token_terms_from_hidden", 4096, 32000, 64, 256, "float32"),
        ("token_terms_from_hidden", 8192, 32000, 64, 256, "float32"),
    ],
    "smoke": [  # seconds on a CPU: for the test of this script
        ("token_terms", 64, 3001, 8, 0, "float32"),
        ("teacher_topk", 64, 3001, 8, 0, "float32"),
        ("token_terms_from_hidden", 64, 3001, 8, 32, "float32"),
    ],
    # Most telling first (a --budget-s cut drops the tail): the lm_head shapes of the Llama 8B student
    # (d 4096) and 70B teacher (d 8192), V 128256, then Qwen's V 151936, then the logits-input ops.
    "gpu": [
        ("token_terms_from_hidden", n, v, 64, d, "bfloat16")
        for n, v, d in (
            (8192, 128256, 4096),
            (16384, 128256, 4096),
            (8192, 128256, 8192),
            (16384, 151936, 4096),
            (16384, 151936, 8192),
        )
    ]
    + [
        (op, n, v, 64, 0, "bfloat16")
        for n in (16384, 4096)
        for v in (128256, 151936, 32000)
        for op in ("token_terms", "teacher_topk")
    ],
}
# Physical limits of an H100 SXM (ANCHORS.md): used for the floors in the GPU table.
HBM_BYTES_PER_S = 3.35e12
BF16_FLOPS = 800e12


def implementations(op: str, device: str) -> list[str]:
    impls = ["oracle", "torch"]
    if device == "cuda":
        impls.append("triton")
        if op == "token_terms_from_hidden":
            try:
                import liger_kernel  # noqa: F401

                impls.append("liger_fused_linear_jsd")
            except ImportError:
                print("Liger comparison skipped: liger-kernel is not installed (pip install 'tropd-ds[liger]')")
    return impls


def synthetic_teacher(n, vocab, k, device, g) -> tk.TeacherTopK:
    """k distinct ids per row and decreasing log-probs, made on `device` without any [N, V] temporary."""
    offset = torch.randint(0, vocab, (n, 1), generator=g, device=device)
    ids = (offset + torch.arange(k, device=device) * max(1, vocab // k)) % vocab
    noise = torch.randn(n, k + 1, generator=g, device=device)
    logprobs = torch.log_softmax(noise * 2, dim=1)[:, :k].sort(1, descending=True).values
    zeros = torch.zeros(n, device=device)
    return tk.TeacherTopK(ids, logprobs, zeros, zeros.clone())


def make_inputs(op, n, vocab, k, d, dtype, device):
    """The case's inputs, drawn on `device` in their own dtype (a generator on that device, seed 0)."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = getattr(torch, dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    teacher = synthetic_teacher(n, vocab, k, device, g)
    if op == "token_terms_from_hidden":
        weight = torch.randn(vocab, d, generator=g, device=device, dtype=dt).mul_(d**-0.5)
        hidden = torch.randn(n, d, generator=g, device=device, dtype=dt)
        t_hidden = torch.randn(n, d, generator=g, device=device, dtype=dt)
        return dict(hidden=hidden, weight=weight, t_hidden=t_hidden, targets=targets, teacher=teacher)
    logits = torch.randn(n, vocab, generator=g, device=device, dtype=dt).mul_(2)
    return dict(logits=logits, targets=targets, teacher=teacher)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


MODES = ("forward", "backward", "full")


def modes_of(op: str, modes: list[str]) -> list[str]:
    return ["forward"] if op == "teacher_topk" else [m for m in MODES if m in modes]


def forward_fn(op, impl, inputs, k):
    """A closure doing one forward and returning the scalar the backward starts from (None for teacher_topk)."""
    t = inputs["targets"]
    if op == "teacher_topk":
        logits = inputs["logits"]

        def forward():
            if impl == "oracle":
                tk.teacher_topk_oracle(logits, t, k)
            else:
                tk.teacher_topk(logits, t, k, backend=impl)

        return forward
    if op == "token_terms":
        logits, teacher = inputs["logits"].requires_grad_(), inputs["teacher"]

        def forward():
            if impl == "oracle":
                terms = tk.token_terms_oracle(logits, t, teacher, fkl_mode="tail")
            else:
                terms = tk.token_terms(logits, t, teacher, fkl_mode="tail", backend=impl)
            return (terms.logprob + terms.fkl).sum()

        return forward
    hidden, weight, teacher = inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_(), inputs["teacher"]

    def forward():
        if impl == "oracle":
            terms = tk.token_terms_oracle(hidden @ weight.t(), t, teacher, fkl_mode="tail")
            return (terms.logprob + terms.fkl).sum()
        if impl == "liger_fused_linear_jsd":
            from liger_kernel.transformers import LigerFusedLinearJSD

            return LigerFusedLinearJSD(jsd_beta=0.0)(hidden, weight, inputs["t_hidden"], weight, t)
        terms = tk.token_terms_from_hidden(hidden, weight, t, teacher, fkl_mode="tail", backend=impl)
        return (terms.logprob + terms.fkl).sum()

    return forward


def clear_grads(inputs) -> None:
    for name in ("logits", "hidden", "weight"):
        if name in inputs:
            inputs[name].grad = None


def runner(op, impl, inputs, k, mode):
    """A closure doing the timed work of `mode` and dropping its results."""
    forward = forward_fn(op, impl, inputs, k)
    if mode == "forward":  # with autograd recording, as in training; the graph is dropped

        def forward_only():
            forward()

        return forward_only
    if mode == "full":

        def full():
            forward().backward()
            clear_grads(inputs)

        return full
    loss = forward()  # backward: one forward outside the timing, its graph kept for every repeat

    def backward():
        loss.backward(retain_graph=True)
        clear_grads(inputs)

    return backward


def grad_bytes(op, n, vocab, d, dtype) -> int:
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    if op == "token_terms":
        return n * vocab * size
    if op == "token_terms_from_hidden":
        return (n * d + vocab * d) * size
    return 0


def timings_ms(run, device, warmup, repeats) -> list[float]:
    """(median, 20%, 80%) in ms: triton.testing.do_bench on a GPU, perf_counter around each repeat on a CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return list(do_bench(run, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    if len(times) == 1:
        return times * 3
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7]]


def measure(op, impl, mode, n, vocab, k, d, dtype, device, warmup, repeats) -> dict:
    inputs = make_inputs(op, n, vocab, k, d, dtype, device)
    run = runner(op, impl, inputs, k, mode)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    median, low, high = timings_ms(run, device, warmup, repeats)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    working = max(0, peak - (grad_bytes(op, n, vocab, d, dtype) if mode != "forward" else 0))
    return dict(
        op=op, mode=mode, impl=impl, N=n, V=vocab, k=k, d=d, dtype=dtype, device=device,
        median_ms=median, p20_ms=low, p80_ms=high, working_mib=working / 2**20,
    )  # fmt: skip


MODE_SHARE = {"forward": 1, "backward": 2, "full": 3}  # passes over [N, V] (or matmuls) at the least


def floor_ms(row) -> float | None:
    size = 2 if row["dtype"] in ("bfloat16", "float16") else 4
    nv, share = row["N"] * row["V"], MODE_SHARE[row["mode"]]
    if row["op"] in ("teacher_topk", "token_terms"):
        return 1e3 * share * nv * size / HBM_BYTES_PER_S  # read (fwd), read + write (bwd)
    return 1e3 * share * 2 * row["N"] * row["d"] * row["V"] / BF16_FLOPS  # one matmul fwd, two bwd


def table(rows, device) -> str:
    head = "| op | mode | N | V | k | d | dtype | impl | median ms | p20-p80 ms | vs oracle | working MiB | vs oracle |"
    if device == "cuda":
        head += " H100 SXM floor ms (3.35 TB/s, 800 TFLOP/s; an H200 has 4.8 TB/s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    same = ("op", "mode", "N", "V", "k", "d")
    for r in rows:
        ref = next((o for o in rows if o["impl"] == "oracle" and all(o[x] == r[x] for x in same)), None)
        case = f"| {r['op']} | {r['mode']} | {r['N']} | {r['V']} | {r['k']} | {r['d']} | {r['dtype']} | {r['impl']} |"
        if "error" in r:
            lines.append(f"{case} error: {r['error']} |")
            continue
        t_ratio = f"{r['median_ms'] / ref['median_ms']:.2f}x" if ref and "median_ms" in ref else "-"
        m_ratio = f"{r['working_mib'] / ref['working_mib']:.3f}x" if ref and ref.get("working_mib") else "-"
        spread = f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}"
        line = f"{case} {r['median_ms']:.1f} | {spread} | {t_ratio} | {r['working_mib']:.1f} | {m_ratio} |"
        if device == "cuda":
            line += f" {floor_ms(r):.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="run only cases whose op contains this text")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="start no measurement that would end past this many seconds"
    )
    args = ap.parse_args()
    if args.preset not in PRESETS:
        ap.error(f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes {args.modes!r}: expected a comma-separated list of {', '.join(MODES)}")
    device = "cuda" if args.preset == "gpu" else "cpu"  # smoke and cpu run on the CPU
    if device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Make glibc return every freed block over 64 KiB to the OS, so that the peak RSS counts
        # each measurement's own allocations instead of reusing memory freed earlier.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--preset gpu needs a CUDA device; use --preset cpu here")
    cases = [c for c in PRESETS[args.preset] if args.only is None or args.only in c[0]]
    work = [(c, mode, impl) for c in cases for mode in modes_of(c[0], modes) for impl in implementations(c[0], device)]
    machine = dict(
        platform=platform.platform(),
        processor=platform.processor(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
    )
    command = f"python {' '.join(sys.argv)}"
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start, slowest = time.perf_counter(), 0.0
    write_results(args.out, machine, command, rows, device, work, done=not work)
    for i, ((op, n, vocab, k, d, dtype), mode, impl) in enumerate(work):
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed + 1.5 * slowest > args.budget_s:
            left = len(work) - i
            print(f"[bench] budget {args.budget_s:.0f} s: stopped after {elapsed:.0f} s, {left} not run", flush=True)
            write_results(args.out, machine, command, rows, device, work[i:], done=True, stopped="budget")
            return
        case = dict(op=op, impl=impl, mode=mode, n=n, vocab=vocab, k=k, d=d, dtype=dtype)
        t0 = time.perf_counter()
        try:
            row = measure(**case, device=device, warmup=args.warmup, repeats=args.repeats)
        except (RuntimeError, ImportError, TypeError) as exc:
            row = dict(op=op, mode=mode, impl=impl, N=n, V=vocab, k=k, d=d, dtype=dtype, device=device)
            row["error"] = str(exc)[:200]
        if device == "cuda":
            torch.cuda.empty_cache()
        row["seconds"] = round(time.perf_counter() - t0, 2)  # wall time of the whole measurement, inputs included
        slowest = max(slowest, row["seconds"])
        rows.append(row)
        write_results(args.out, machine, command, rows, device, work[i + 1 :], done=i + 1 == len(work))
        print(f"[bench {i + 1}/{len(work)}] {row_line(row)}", flush=True)
    print((args.out / "RESULTS.md").read_text())


def row_line(row: dict) -> str:
    case = f"{row['op']} {row['mode']} N={row['N']} V={row['V']} d={row['d']} {row['dtype']} {row['impl']}"
    if "error" in row:
        return f"{case}: error: {row['error']}"
    return f"{case}: {row['median_ms']:.3f} ms, {row['working_mib']:.1f} MiB ({row['seconds']:.1f} s)"


def write_atomic(path: Path, text: str) -> None:
    """`path` holds either its old or its new text at every moment (a run killed mid-write leaves valid JSON)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, machine, command, rows, device, pending, done: bool, stopped: str | None = None) -> None:
    """RESULTS.json and RESULTS.md with every row so far; `pending`: the measurements not (yet) run."""
    not_run = [dict(op=c[0], N=c[1], V=c[2], k=c[3], d=c[4], dtype=c[5], mode=m, impl=i) for c, m, i in pending]
    status = stopped or ("complete" if done else "running")
    data = dict(machine=machine, command=command, status=status, rows=rows, not_run=not_run)
    write_atomic(out / "RESULTS.json", json.dumps(data, indent=2))
    md = f"Machine: {json.dumps(machine)}\n\nCommand: `{command}`\n\n{table(rows, device)}\n"
    if not_run:
        what = "not run (budget spent)" if stopped else "still to run"
        md += f"\n{len(not_run)} measurements {what}.\n"
    write_atomic(out / "RESULTS.md", md)


if __name__ == "__main__":
    main()
