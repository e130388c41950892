"""scripts/bench_kernels.py in every mode on tiny shapes: JSON rows and a Markdown table per case and mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mode_is_timed_and_written(tmp_path):
    cmd = [sys.executable, "scripts/bench_kernels.py", "--preset", "smoke", "--repeats", "5", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "RESULTS.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    seen = {(r["op"], r["mode"], r["impl"]) for r in rows}
    for op in ("token_terms", "token_terms_from_hidden"):
        for mode in ("forward", "backward", "full"):
            assert {(op, mode, "oracle"), (op, mode, "torch")} <= seen
    assert {(r["op"], r["mode"]) for r in rows if r["op"] == "teacher_topk"} == {("teacher_topk", "forward")}
    for r in rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| op | mode |" in table and "| token_terms_from_hidden | backward |" in table


def test_a_bad_mode_is_named():
    cmd = [sys.executable, "scripts/bench_kernels.py", "--preset", "smoke", "--modes", "fwd"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (
        out.returncode == 2
        and "--modes 'fwd': expected a comma-separated list of forward, backward, full" in out.stderr
    )
