#!/usr/bin/env python
"""The tables of docs/SCALING.md, from `tropd_ds.plan` (no GPU needed):

    python scripts/scaling_tables.py > /tmp/tables.md

1. The planner's verdict for each preset on 1 x 8 and 2 x 8 GPUs of 80 GB, CPU and NVMe teacher offload:
   the peak per GPU (the rollout phase counts the prefill's working set, the update the lm_head weight
   gradient's fp32 temporaries) and the host memory per node with its reserve (OS and page cache, the
   ranks' processes, checkpoint staging and export: `plan.Hardware`'s host_* fields).
2. The rollout micro-batch of the Llama 1 x 8 preset: rollout time and peak per GPU for each size.
3. The largest student (Llama-3.1-8B's width, more layers) next to Llama-3.1-70B, and the largest
   teacher (Llama-3.1-70B's width, more layers) next to Llama-3.1-8B, per GPU count, with the
   presets' workload (128 x 4 rollouts of 1,024 + 8,096 tokens, k 64, prefill over prompt + prefix).
4. `tropd-ds plan`'s full text for the first preset.
5. The Llama 1 x 8 preset with its teacher in the job and served on 8 or 16 GPUs of its own
   (`tropd-ds serve-teacher`, `plan --teacher-gpus`), with and without rollout micro-batches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tropd_ds import plan as P  # noqa: E402
from tropd_ds.config import load_config  # noqa: E402


def preset_rows() -> list[str]:
    rows = [
        "| preset | GPUs | teacher offload | peak GiB per GPU (phase) | host GiB per node (reserve) | step s "
        "(rollout / teacher / update) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("llama70b_to_llama8b", "qwen72b_to_qwen7b"):
        for shape, nodes in (("1x8", 1), ("2x8", 2)):
            cfg = load_config(ROOT / f"configs/presets/{name}_{shape}.yaml")
            s, t, wl = P.workload_from_run_config(cfg)
            for offload in ("cpu", "nvme"):
                w = dataclasses.replace(wl, teacher_offload=offload, nvme_buffer_size=1.3e9)
                r = P.plan(P.load_arch(s), P.load_arch(t), P.Hardware(nodes=nodes), w)
                st, g = r["step_seconds"], r["gpu_gib"]
                rows.append(
                    f"| {name}_{shape} | {8 * nodes} | {offload} | {g['total']:.1f} ({g['peak_phase']}) | "
                    f"{r['host_gib_per_node']['total']:.0f} ({r['host_gib_per_node']['reserve']:.0f}) | "
                    f"{st['total']:.0f} ({st['rollout']:.0f} / {st['teacher_scoring']:.0f} / {st['update']:.0f}) | "
                    f"{'fits' if r['fits'] else 'no'} |"
                )
    return rows


def micro_batch_rows() -> list[str]:
    cfg = load_config(ROOT / "configs/presets/llama70b_to_llama8b_1x8.yaml")
    s, t, wl = P.workload_from_run_config(cfg)
    rows = [
        "| rollout.micro_batch_size | rollout s per step | prefill working set GiB | KV cache GiB | peak GiB per GPU "
        "| verdict |",
        "|---|---|---|---|---|---|",
    ]
    for size in (4, 8, 12, 16, 32, 0):
        r = P.plan(P.load_arch(s), P.load_arch(t), P.Hardware(), dataclasses.replace(wl, rollout_micro_batch=size))
        g = r["gpu_gib"]
        rows.append(
            f"| {size or 'all 64'} | {r['step_seconds']['rollout']:.0f} | "
            f"{g['phases']['rollout']['prefill working set']:.1f} | {g['phases']['rollout']['KV cache']:.1f} | "
            f"{g['total']:.1f} | {'fits' if r['fits'] else 'no'} |"
        )
    return rows


def largest(base: str, other: str, role: str, hw: P.Hardware, wl: P.Workload) -> tuple[float, int]:
    """Most layers (and parameters) of `base`'s shape that still fits beside `other`."""
    arch, fixed = P.load_arch(base), P.load_arch(other)
    best = (0.0, 0)
    for layers in range(1, 4000):
        a = dataclasses.replace(arch, layers=layers)
        pair = (a, fixed) if role == "student" else (fixed, a)
        if not P.plan(*pair, hw, wl)["fits"]:
            break
        best = (a.params() / 1e9, layers)
    return best


def largest_rows() -> list[str]:
    wl = P.Workload(rollout_micro_batch=16)
    rows = [
        "| GPUs (80 GB, 1 TiB host per node) | largest student beside Llama-3.1-70B | largest teacher beside "
        "Llama-3.1-8B (CPU offload) |",
        "|---|---|---|",
    ]
    for nodes, gpn in ((1, 8), (2, 8), (4, 8)):
        hw = P.Hardware(gpus_per_node=gpn, nodes=nodes)
        s_b, s_l = largest("llama-3.1-8b", "llama-3.1-70b", "student", hw, wl)
        t_b, t_l = largest("llama-3.1-70b", "llama-3.1-8b", "teacher", hw, wl)
        rows.append(
            f"| {nodes} x {gpn} | {s_b:.1f} B ({s_l} layers of d 4,096) | {t_b:.0f} B ({t_l} layers of d 8,192) |"
        )
    return rows


def served_rows() -> list[str]:
    cfg = load_config(ROOT / "configs/presets/llama70b_to_llama8b_1x8.yaml")
    s, t, wl = P.workload_from_run_config(cfg)
    rows = [
        "| teacher | rollout micro-batch | student side: peak GiB per GPU, host GiB per node | teacher side: GiB "
        "per GPU, host GiB per node | step s (rollout / teacher / update) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    layouts = [
        ("in the job, CPU offload (the preset)", 0, "cpu"),
        ("served, 8 GPUs, CPU offload", 0, "cpu"),
        ("served, 8 GPUs, on the GPUs", 0, "none"),
        ("served, 16 GPUs, on the GPUs", 0, "none"),
    ]
    for name, gpus, offload in layouts:
        for size in sorted({wl.rollout_micro_batch, 16}):
            w = dataclasses.replace(wl, teacher_gpus=gpus, teacher_offload=offload, rollout_micro_batch=size)
            if "served" in name:
                w = dataclasses.replace(w, teacher_gpus=int(name.split(", ")[1].split()[0]))
            r = P.plan(P.load_arch(s), P.load_arch(t), P.Hardware(), w)
            st, g, sv = r["step_seconds"], r["gpu_gib"], r["teacher_service"]
            teacher_side = (
                "(shared)" if sv is None else (f"{sv['gpu_gib']['total']:.1f}, {sv['host_gib_per_node']['total']:.0f}")
            )
            rows.append(
                f"| {name} | {size or 'all 64'} | {g['total']:.1f}, {r['host_gib_per_node']['total']:.0f} | "
                f"{teacher_side} | {st['total']:.0f} ({st['rollout']:.0f} / {st['teacher_scoring']:.0f} / "
                f"{st['update']:.0f}){', overlapped' if st['overlapped'] else ''} | {'fits' if r['fits'] else 'no'} |"
            )
    return rows


def first_preset_text() -> str:
    cfg = load_config(ROOT / "configs/presets/llama70b_to_llama8b_1x8.yaml")
    s, t, wl = P.workload_from_run_config(cfg)
    return P.format_plan(P.plan(P.load_arch(s), P.load_arch(t), P.Hardware(), wl))


if __name__ == "__main__":
    print("\n".join(preset_rows()))
    print()
    print("\n".join(micro_batch_rows()))
    print()
    print("\n".join(largest_rows()))
    print()
    print(first_preset_text())
    print()
    print("\n".join(served_rows()))
