"""Peak memory of `token_terms_from_hidden`'s forward + backward on the CPU, with the lm_head weight gradient
accumulated in place (now) or through a fresh fp32 [V, d] product per block (`--before`, as it was until
2026-11-30), and whether the gradients agree. One process per mode (peak RSS is per process):

    python scripts/bench_weight_grad.py --out bench_out/weight_grad   # runs both modes, writes RESULTS.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(mode: str, n: int, vocab: int, d: int, out: Path) -> dict:
    sys.path[:0] = [str(ROOT / "kernels"), str(ROOT / "scripts")]
    import bench_kernels as bench
    import torch
    import tropd_kernels as tk
    from tropd_kernels import projection
    from tropd_kernels.ops import token_terms as ops

    if mode == "before":

        def add_through_a_temporary(acc, a, b):
            acc += projection.mm_fp32(a, b)
            return acc

        ops.addmm_fp32_ = add_through_a_temporary
    x = bench.make_inputs("token_terms_from_hidden", n, vocab, 64, d, "float32", "cpu")
    hidden, weight = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    start = bench.reset_peak_rss()
    terms = tk.token_terms_from_hidden(hidden, weight, x["targets"], x["teacher"], fkl_mode="tail")
    (terms.logprob + terms.fkl).sum().backward()
    peak = bench._status_kib("VmHWM") * 1024
    torch.save({"hidden": hidden.grad, "weight": weight.grad}, out / f"grads_{mode}.pt")
    rows = projection.chunk_rows(vocab, None, torch.device("cpu"))
    return dict(mode=mode, N=n, V=vocab, d=d, block_rows=rows, peak_mib=round((peak - start) / 2**20, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out/weight_grad"))
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--_mode", choices=["before", "after"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args._mode:
        print(json.dumps(measure(args._mode, args.n, args.vocab, args.d, args.out)))
        return 0
    rows = []
    for mode in ("before", "after"):
        cmd = [sys.executable, __file__, "--_mode", mode, "--out", str(args.out)]
        cmd += ["--n", str(args.n), "--vocab", str(args.vocab), "--d", str(args.d)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    import torch

    before, after = (torch.load(args.out / f"grads_{m}.pt") for m in ("before", "after"))
    diff = {k: float((after[k] - before[k]).abs().max() / before[k].abs().max()) for k in before}
    result = dict(rows=rows, max_relative_difference=diff)
    (args.out / "RESULTS.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        shape = f"N={r['N']} V={r['V']} d={r['d']} blocks of {r['block_rows']} rows"
        print(f"{r['mode']:6}  {shape}: peak {r['peak_mib']} MiB")
    print("gradients, largest difference relative to the largest entry:", diff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
