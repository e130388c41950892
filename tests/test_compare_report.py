"""The comparison report's verdicts: paired per-seed differences with a 95% t-interval."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/compare_objectives.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("compare_objectives", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_difference_is_the_mean_and_t_interval_of_the_per_seed_differences(report):
    # differences 5, 10, 5 points: mean 6.667, sd 2.887, t(2) = 4.303 -> half-width 4.303 * 2.887 / sqrt(3)
    mean, half = report.paired_difference([0.80, 0.70, 0.90], [0.75, 0.60, 0.85])
    assert mean == pytest.approx(20 / 3)
    assert half == pytest.approx(4.303 * (25 / 3) ** 0.5 / 3**0.5)
    assert report.paired_difference([0.5], [0.25]) == (pytest.approx(25.0), None)


def test_a_row_wins_or_loses_only_when_its_interval_excludes_zero(report):
    def results(*afters):
        return [{"after": a} for a in afters]

    table = report.difference_table(
        {
            "tropd": results(0.75, 0.60, 0.85),
            "close": results(0.80, 0.70, 0.90),  # +6.7 +- 7.2: not distinguishable
            "better": results(0.90, 0.80, 1.00),  # +16.7 +- 7.2
            "worse": results(0.05, 0.10, 0.02),
            "tropd k=18": results(0.75, 0.60, 0.85),  # the reference run itself, under its ablation name
        },
        ["tropd", "close", "better", "worse", "tropd k=18"],
        "tropd",
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert set(rows) == {"close", "better", "worse"}
    assert rows["close"].endswith("| +6.7 ± 7.2 | not distinguishable |")
    assert rows["better"].endswith("| higher |") and rows["worse"].endswith("| lower |")
    assert "| 90.0, 80.0, 100.0 |" in rows["better"]


def test_the_curve_table_gives_each_rows_mean_and_spread_at_every_evaluation_step(report):
    table = report.curve_table(
        {
            "tropd": [{"curve": [(0, 0.1), (40, 0.2), (80, 0.6)]}, {"curve": [(0, 0.1), (40, 0.4), (80, 0.8)]}],
            "opd": [{"curve": [(0, 0.1), (40, 0.05), (80, 0.0)]}, {"curve": [(0, 0.1), (40, 0.05)]}],
        },
        ["tropd", "opd"],
    )
    assert table[0] == "| run | step 0 | step 40 | step 80 |"
    assert table[2] == "| tropd | 10.0 ± 0.0 | 30.0 ± 14.1 | 70.0 ± 14.1 |"
    assert table[3] == "| opd | 10.0 ± 0.0 | 5.0 ± 0.0 | n/a |"  # a seed without step 80: no mean to give


def test_marked_accuracy_counts_only_final_answers_written_as_hash_n(report, tmp_path):
    """The trainer's answer check falls back to the last number; the report's '#N' column does not."""
    import json

    rows = [
        {"answer": "3", "completions": ["9-1=8;8-4=4;4-1=3;#3"]},  # right
        {"answer": "3", "completions": ["3+3+3+3+3+"]},  # no '#': the last-number fallback would call it right
        {"answer": "15", "completions": ["9+1=10;#15;#1"]},  # the last '#N' is the answer: wrong
    ]
    (tmp_path / "step200-rank0.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    (tmp_path / "step200-rank1.jsonl").write_text(json.dumps(rows[2]) + "\n")
    (tmp_path / "step40-rank0.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert report.marked_accuracy(tmp_path, 200) == pytest.approx(1 / 3)
    assert report.marked_accuracy(tmp_path, 40) == 1.0
    assert report.marked_accuracy(tmp_path, 80) != report.marked_accuracy(tmp_path, 80)  # nothing there: NaN
