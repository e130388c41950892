"""The demo end to end, shortened: the shipped demo models and configs/demo.yaml under the real
launcher for a few steps, then the plots; plus the shipped assets are what the build report says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import cpu_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "demo_assets"


def test_shipped_demo_models_fit_the_brief():
    report = json.loads((ASSETS / "build_report.json").read_text())
    assert report["teacher_accuracy"] >= 0.9
    assert report["student_accuracy"] <= 0.5
    assert report["student_params"] * 4 <= report["teacher_params"]
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"demo assets take {size / 2**20:.1f} MiB"
    train = {json.loads(x)["prompt"] for x in (ASSETS / "train.jsonl").read_text().splitlines()}
    held_out = {json.loads(x)["prompt"] for x in (ASSETS / "eval.jsonl").read_text().splitlines()}
    assert train and held_out and not train & held_out


def test_shortened_demo_runs_end_to_end_and_plots(tmp_path):
    sets = {
        "optim.steps": 2,
        "rollout.prompts_per_step": 4,
        "student.micro_batch_size": 4,
        "eval.max_prompts": 8,
        "eval.every": 0,
        "checkpoint.dir": tmp_path / "ckpt",
        "checkpoint.export_dir": tmp_path / "export",
        "checkpoint.every": 0,
        "logging.dir": tmp_path / "logs",
    }
    args = ["--module", "tropd_ds.train", "--config", ROOT / "configs/demo.yaml"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    proc = cpu_ranks(args, cwd=tmp_path)
    assert "held-out accuracy:" in proc.stdout and (tmp_path / "export/model.safetensors").is_file()
    plots = subprocess.run(
        [sys.executable, str(ROOT / "scripts/plot_metrics.py"), str(tmp_path / "logs/metrics.jsonl"), "--out", str(tmp_path / "plots")],
        capture_output=True,
        text=True,
        check=True,
    )
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == ["accuracy.png", "grad_norm.png", "log_ratio.png", "trust_fraction.png"], plots.stdout
