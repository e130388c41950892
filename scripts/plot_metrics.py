#!/usr/bin/env python
"""PNG plots of a run's metrics.jsonl: held-out accuracy, trust fraction, log-ratio quantiles, gradient norm.

python scripts/plot_metrics.py runs/demo/logs/metrics.jsonl --out runs/demo/plots
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("accuracy.png", "held-out accuracy", [("eval_accuracy", "exact match")]),
    ("trust_fraction.png", "trust fraction (mean M over sampled tokens)", [("trust_fraction", "trust fraction")]),
    (
        "log_ratio.png",
        "log-ratio r = lp_T - lp_S on sampled tokens",
        [("log_ratio_mean", "mean"), ("log_ratio_p10", "p10"), ("log_ratio_p1", "p1")],
    ),
    ("grad_norm.png", "gradient norm", [("grad_norm", "grad norm")]),
]


def plot(metrics_path: Path, out_dir: Path) -> list[Path]:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, series in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in series:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key == "eval_accuracy" else None, label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.metrics.is_file():
        ap.error(f"{args.metrics} does not exist: expected a run's metrics.jsonl")
    for path in plot(args.metrics, args.out):
        print(path)


if __name__ == "__main__":
    main()
