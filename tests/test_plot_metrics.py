"""scripts/plot_metrics.py: one run or several on the same axes; a label count that does not match is named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_run(path: Path, final: float) -> Path:
    path.parent.mkdir(parents=True)
    records = [{"step": 0, "eval_accuracy": 0.1}]
    records += [{"step": s, "trust_fraction": 0.5, "grad_norm": 1.0, "log_ratio_mean": -1.0} for s in (1, 2)]
    records += [{"step": 2, "eval_accuracy": final}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_several_runs_on_the_same_axes(tmp_path):
    runs = [str(write_run(tmp_path / f"seed{i}/metrics.jsonl", 0.5 + i / 10)) for i in range(3)]
    cmd = [sys.executable, str(ROOT / "scripts/plot_metrics.py"), *runs, "--labels", "a", "b", "c"]
    subprocess.run([*cmd, "--out", str(tmp_path / "plots")], check=True, capture_output=True, text=True)
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == ["accuracy.png", "grad_norm.png", "log_ratio.png", "trust_fraction.png"]
    bad = subprocess.run([*cmd[:-1], "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--labels has 2 labels for 3 metrics files" in bad.stderr


def test_each_run_is_a_line_with_its_own_values_and_label(tmp_path):
    """What the panels draw, read back from the figures: one line per run and series, each with its run's data."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import matplotlib.pyplot as plt
    import plot_metrics

    runs = [[json.loads(x) for x in write_run(tmp_path / f"s{i}/m.jsonl", 0.5 + i / 10).read_text().splitlines()]
            for i in range(3)]  # fmt: skip
    drawn = {name: fig for name, fig in plot_metrics.figures(runs, ["a", "b", "c"])}
    lines = drawn["accuracy.png"].axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a: exact match", "b: exact match", "c: exact match"]
    assert [list(line.get_ydata()) for line in lines] == [[0.1, 0.5], [0.1, 0.6], [0.1, 0.7]]
    assert [list(line.get_xdata()) for line in lines] == [[0, 2]] * 3
    assert len(drawn["trust_fraction.png"].axes[0].get_lines()) == 3
    assert len(drawn["log_ratio.png"].axes[0].get_lines()) == 3  # only the mean is in these records
    for fig in drawn.values():
        plt.close(fig)
