"""examples/gsm8k: the data preparation on a local file with the hub data set's schema (no network), and the
run configs checked by `tropd-ds train --dry-run` on the meta device with the prepared data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tropd_ds.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples/gsm8k"
HUB_ROWS = [  # openai/gsm8k's schema: question, answer (a worked solution with <<...>> and a last '#### N')
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1,200 pens a week. How many in 3 weeks?",
     "answer": "3 * 1200 = <<3*1200=3600>>3600\n#### 3,600"},
    {"question": "What is 5 minus 9?", "answer": "5 - 9 = <<5-9=-4>>-4\n#### -4"},
]  # fmt: skip


def prepare(tmp_path, rows) -> subprocess.CompletedProcess:
    source = tmp_path / "gsm8k_main.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, str(EXAMPLE / "prepare.py"), "--source", str(source), "--out", str(tmp_path / "data")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_prepare_turns_the_hub_rows_into_the_packages_columns(tmp_path):
    done = prepare(tmp_path, HUB_ROWS)
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (tmp_path / f"data/{split}.jsonl").read_text().splitlines()]
        assert [r["answer"] for r in rows] == ["72", "3600", "-4"]
        first = rows[0]
        assert set(first) == {"prompt", "answer", "teacher_response"}
        assert first["prompt"].startswith("Natalia sold clips") and first["prompt"].endswith("\\boxed{}.")
        assert "<<" not in first["teacher_response"] and first["teacher_response"].endswith("\\boxed{72}.")
        assert "####" not in first["teacher_response"]


def test_a_row_without_a_final_answer_line_is_named(tmp_path):
    done = prepare(tmp_path, [*HUB_ROWS, {"question": "q", "answer": "no final line"}])
    assert done.returncode != 0 and "without a final '#### <number>' line: 'no final line'" in done.stderr


@pytest.mark.parametrize("config", ["qwen7b_from_qwen72b.yaml", "llama8b_from_llama70b.yaml"])
def test_the_example_configs_check_out_on_the_meta_device_with_the_prepared_data(tmp_path, config, capsys):
    assert prepare(tmp_path, HUB_ROWS * 4).returncode == 0
    data = tmp_path / "data"
    sets = ["--set", f"data.path={data / 'train.jsonl'}", "--set", f"data.eval_path={data / 'test.jsonl'}"]
    code = train_main(["--config", str(EXAMPLE / config), "--dry-run", "--world-size", "8", *sets])
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-3000:]
    assert "dry run" in (out.out + out.err).lower()
