"""Rank 0's progress: a bar on a terminal, plain lines in a log file (a batch job's)."""

from __future__ import annotations

import io

from tropd_ds.progress import StepProgress

RECORD = {"loss": 0.0333, "trust_fraction": 0.93, "tokens_per_s": 243.0}


def test_in_a_file_about_twenty_plain_lines_a_run_with_the_first_and_last_step():
    from transformers.utils import logging as hf_logging

    out = io.StringIO()
    progress = StepProgress(200, 0, stream=out)
    assert not hf_logging.is_progress_bar_enabled()  # nor the export's "Writing model shards" bar
    hf_logging.enable_progress_bar()
    for _ in range(200):
        progress.update(RECORD)
    progress.close()
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 20 <= len(lines) <= 22, lines
    assert lines[0].startswith("[tropd-ds] step 1/200 (0%): loss 0.0333, trust 0.93, 243 tokens/s; ")
    assert lines[-1].startswith("[tropd-ds] step 200/200 (100%)") and lines[-1].endswith("about 0 s left")
    assert "s/step, about " in lines[1]


def test_a_resumed_run_counts_from_its_step_and_a_short_run_reports_every_step():
    out = io.StringIO()
    progress = StepProgress(10, 6, stream=out)
    for _ in range(4):
        progress.update(RECORD)
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == [
        f"[tropd-ds] step {n}/10 ({10 * n}%)" for n in (7, 8, 9, 10)
    ]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_progress_bar():
    out = Terminal()
    progress = StepProgress(5, 0, stream=out)
    for _ in range(5):
        progress.update(RECORD)
    progress.close()
    text = out.getvalue()
    assert "distill:" in text and "\r" in text and "5/5" in text and "loss=0.0333" in text
    assert "[tropd-ds] step" not in text
