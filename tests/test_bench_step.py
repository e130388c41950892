"""scripts/bench_step.py prints no figure it cannot stand behind: run lengths too close to measure are refused
before any run, and a per-step time whose pairs disagree (or go negative) is reported as not measurable."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_step  # noqa: E402


def test_run_lengths_too_close_to_measure_are_refused_before_any_run(capsys):
    assert bench_step.main(["--short", "3", "--long", "5", "--repeats", "3", "--skip-trl"]) == 2
    err = capsys.readouterr().err
    assert "--short 3 --long 5: the long run must be at least 20 steps longer than the short one" in err
    assert bench_step.main(["--pairs", "1", "--skip-trl"]) == 2
    assert "--pairs 1: at least 2 (short, long) pairs are needed" in capsys.readouterr().err
    assert bench_step.check_run_lengths(10, 30, 2) is None


def test_a_per_step_time_is_the_median_of_the_pairs_and_none_when_they_disagree():
    good = bench_step.summarise([0.080, 0.085, 0.090])
    assert good["measured"] and good["per_step_s"] == 0.085 and good["min_s"] == 0.080 and good["max_s"] == 0.090
    assert abs(good["spread"] - 0.010 / 0.085) < 1e-12
    for estimates in ([-0.15, 0.08, 0.09], [0.05, 0.08, 0.20]):  # a negative one; a spread of 190%
        bad = bench_step.summarise(estimates)
        assert not bad["measured"] and bad["per_step_s"] is None
    table = bench_step.table({
        "rollout": {},
        "tropd": {**bad, "rollout_s": 0.01, "teacher_s": 0.02, "update_s": 0.03, "response_len": 9.0},
        "trl": good,
    })  # fmt: skip
    assert "not measurable (estimates 0.0500, 0.0800, 0.2000)" in table and "| n/a |" in table
    assert "0.0850 (0.0800-0.0900)" in table
