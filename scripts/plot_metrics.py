#!/usr/bin/env python
"""PNG plots of a run's metrics.jsonl: held-out accuracy, trust fraction, log-ratio quantiles, gradient norm.

python scripts/plot_metrics.py runs/demo/logs/metrics.jsonl --out runs/demo/plots
python scripts/plot_metrics.py seed0/metrics.jsonl seed1/metrics.jsonl --labels "seed 0" "seed 1" --out plots

Several runs are drawn on the same axes, one line per run and series.
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


def figures(runs: list[list[dict]], labels: list[str]):
    """(file name, figure) per panel: every run's series on the same axes, one line each."""
    for name, title, series in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for records, run in zip(runs, labels):
            for key, label in series:
                pts = [(r["step"], r[key]) for r in records if key in r]
                if pts:
                    text = f"{run}: {label}" if run else label
                    ax.plot(*zip(*pts), marker="o" if key == "eval_accuracy" else None, label=text)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1 or len(runs) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        yield name, fig


def plot(metrics_path: Path | list[Path], out_dir: Path, labels: list[str] | None = None) -> list[Path]:
    paths = [metrics_path] if isinstance(metrics_path, Path) else list(metrics_path)
    runs = [[json.loads(line) for line in p.read_text().splitlines() if line.strip()] for p in paths]
    labels = labels or ([""] if len(paths) == 1 else [p.parent.name for p in paths])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(runs, labels):
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", type=Path, nargs="+", help="one or more runs' metrics.jsonl")
    ap.add_argument("--labels", nargs="+", default=None, help="one label per metrics file (default: folder names)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for m in args.metrics:
        if not m.is_file():
            ap.error(f"{m} does not exist: expected a run's metrics.jsonl")
    if args.labels is not None and len(args.labels) != len(args.metrics):
        ap.error(f"--labels has {len(args.labels)} labels for {len(args.metrics)} metrics files: expected one each")
    for path in plot(args.metrics, args.out, args.labels):
        print(path)


if __name__ == "__main__":
    main()
