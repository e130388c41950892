"""scripts/bench_rollout.py: the decode loop timed in its four settings, the same tokens in each, a JSON and a
table; bad shapes named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--vocab", "64",
        "--rows", "3", "--prompt", "8", "--new-tokens", "6", "--repeats", "2"]  # fmt: skip


def run(*args):
    cmd = [sys.executable, "scripts/bench_rollout.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_setting_is_timed_with_the_same_tokens_and_written(tmp_path):
    done = run(*TINY, "--device", "cpu", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "RESULTS.json").read_text())
    assert [r["setting"] for r in data["rows"]] == [
        "dynamic, ask every token",
        "dynamic, ask every 16",
        "preallocated, ask every token",
        "preallocated, ask every 16",
    ]
    assert data["shape"]["layers"] == 2 and data["shape"]["rows"] == 3 and data["preset"] == "cpu"
    for r in data["rows"]:
        assert r["same_tokens_as_first"] is True and r["ms_per_token"] > 0
        lo, hi = r["ms_per_token_range"]
        assert lo <= r["ms_per_token"] <= hi and r["ms_per_layer_per_token_at_one_row"] > 0
    table = (tmp_path / "RESULTS.md").read_text()
    assert "2 Llama layers (d 32, 2 heads / 1 KV, V 64)" in table and table.count("| yes |") == 4


def test_bad_shapes_are_named():
    bad = run(*TINY, "--heads", "3")
    assert bad.returncode == 2 and "--heads 3, --kv-heads 1, --hidden 32: expected heads divisible" in bad.stderr
    zero = run("--rows", "0")
    assert zero.returncode == 2 and "0: expected an integer >= 1" in zero.stderr
