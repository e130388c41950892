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
