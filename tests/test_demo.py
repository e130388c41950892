"""The demo end to end, shortened: the shipped demo models and configs/demo.yaml under the real
launcher for a few steps, then the plots; plus the shipped assets are what the build report says."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import cpu_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "demo_assets"


def shipped_accuracy(folder: Path, rows: list[dict]) -> float:
    """Greedy held-out accuracy of a shipped model, measured here (the demo's '#N' answer pattern)."""
    from deepspeed.runtime.rollout import SamplingConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tropd_ds import rollout
    from tropd_ds.config import answer_pattern, load_config
    from tropd_ds.data import Prompt
    from tropd_ds.evaluation import is_correct

    tok, lm = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = rollout.GenerateRollout(lm, tok.pad_token_id, rollout.end_token_ids(tok, lm), gather=False)
    prompts = [Prompt(i, tok(r["prompt"])["input_ids"], None, None) for i, r in enumerate(rows)]
    cfg = load_config(ROOT / "configs/demo.yaml")
    sampling = SamplingConfig(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    tokens = rollout.sample(engine, prompts, [[]] * len(prompts), sampling, "cpu")
    pattern = answer_pattern(cfg.eval.answer_pattern)
    right = 0
    for i, r in enumerate(rows):
        text = tok.decode(tokens.input_ids[i, 1:][tokens.sampled[i]], skip_special_tokens=True)
        right += is_correct(text, r["answer"], "exact", pattern)
    return right / len(rows)


def test_shipped_demo_models_fit_the_brief():
    """Measured on the shipped weights, not read from build_report.json: a teacher that solves the held-out
    task, a student that does not, a student at most a quarter of the teacher's size."""
    from safetensors import safe_open

    def params(folder: Path) -> int:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    rows = [json.loads(x) for x in (ASSETS / "eval.jsonl").read_text().splitlines()][:100]
    teacher, student = shipped_accuracy(ASSETS / "teacher", rows), shipped_accuracy(ASSETS / "student", rows)
    assert teacher >= 0.9 and student <= 0.5, (teacher, student)
    assert params(ASSETS / "student") * 4 <= params(ASSETS / "teacher")
    report = json.loads((ASSETS / "build_report.json").read_text())  # and the report tells the truth
    assert (report["teacher_params"], report["student_params"]) == (
        params(ASSETS / "teacher"),
        params(ASSETS / "student"),
    )
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
    proc = cpu_ranks(args, cwd=tmp_path, cli=True)  # the `deepspeed` command, as `make demo` runs it
    assert "held-out accuracy:" in proc.stdout and (tmp_path / "export/model.safetensors").is_file()
    assert "answer check on the last match of '#\\\\s*(-?[0-9]+)'" in proc.stdout  # the demo's answers are '#N'
    # its log in a file (a pipe here): a plain line per reported step, no progress bar redrawn with carriage returns
    assert "[tropd-ds] step 1/2 (50%): loss " in proc.stderr and "[tropd-ds] step 2/2 (100%)" in proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "distill:" not in proc.stderr
    for path in (tmp_path / "logs/eval").glob("step*-rank*.jsonl"):  # no credit without a final '#N'
        for record in map(json.loads, path.read_text().splitlines()):
            for text, ok in zip(record["completions"], record["correct"]):
                assert not ok or re.findall(r"#\s*(-?[0-9]+)", text)[-1:] == [record["answer"]], (text, record)
    records = [json.loads(x) for x in (tmp_path / "logs/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in records if "eval_accuracy" in r] == [0, 2]
    expected = {"loss", "loss_trusted", "loss_outlier", "loss_guidance", "trust_fraction", "log_ratio_mean"}
    expected |= {"log_ratio_p1", "log_ratio_p10", "fkl_mean", "topk_mass_mean", "student_entropy_mean"}
    expected |= {"teacher_entropy_mean", "grad_norm", "lr", "response_len", "prefix_len", "tokens_per_s"}
    for r in steps:
        assert expected <= set(r), expected - set(r)
        assert all(math.isfinite(r[k]) for k in expected), {k: r[k] for k in expected}
    for r in (r for r in records if "eval_accuracy" in r):
        # every completion has at least its end token and at most the eval budget of new tokens
        assert r["eval_completions"] == 8 and 1 <= r["eval_response_tokens"] <= 36, r
    plots = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/plot_metrics.py"),
            str(tmp_path / "logs/metrics.jsonl"),
            "--out",
            str(tmp_path / "plots"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == ["accuracy.png", "grad_norm.png", "log_ratio.png", "trust_fraction.png"], plots.stdout


@pytest.mark.launches
def test_plain_opd_on_the_demo_does_not_learn_to_emit_pad(tmp_path):
    """With the response mask taken by id (DeepSpeed's), sampled pad tokens left the loss and plain OPD
    drove the student to ~99% pad in 60 steps. By position, every sampled pad is scored like any token.
    40 steps show it: with the mask by id put back, the last 10 of them sample more than 2% pad."""
    import torch
    from deepspeed.runtime.rollout import SamplingConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tropd_ds import rollout
    from tropd_ds.data import Prompt

    sets = {
        "objective.name": "opd",
        "objective.options": "{}",
        "rollout.guidance": "false",
        "optim.steps": 40,
        "rollout.prompts_per_step": 16,
        "student.micro_batch_size": 8,
        "eval.every": 0,
        "eval.max_prompts": 8,
        "checkpoint.dir": tmp_path / "ckpt",
        "checkpoint.export_dir": tmp_path / "export",
        "checkpoint.every": 0,
        "logging.dir": tmp_path / "logs",
        "logging.progress": "false",
    }
    args = ["--module", "tropd_ds.train", "--config", ROOT / "configs/demo.yaml"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    cpu_ranks(args, cwd=tmp_path)
    steps = [json.loads(x) for x in (tmp_path / "logs/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 40 and all(r["sampled_pad_fraction"] < 0.02 for r in steps[-10:]), [
        r["sampled_pad_fraction"] for r in steps[-10:]
    ]
    assert steps[-1]["response_len"] > 10  # answers keep their length

    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    rows = [json.loads(x) for x in (ASSETS / "eval.jsonl").read_text().splitlines()][:128]
    prompts = [Prompt(i, tok(r["prompt"])["input_ids"], None, None) for i, r in enumerate(rows)]
    engine = rollout.GenerateRollout(lm, tok.pad_token_id, rollout.end_token_ids(tok, lm), gather=False)
    torch.manual_seed(0)
    tokens = rollout.sample(
        engine, prompts, [[]] * len(prompts), SamplingConfig(max_new_tokens=36, temperature=1.0), "cpu"
    )
    seen = tokens.input_ids[:, 1:][tokens.sampled]
    assert float((seen == tok.pad_token_id).float().mean()) < 0.02


def test_the_answer_only_student_answers_without_the_worked_format():
    """The demo's mismatch setting (docs/REFERENCE.md): the answer-only student writes `#answer`, far from it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ASSETS / "student_answer_only"
    report = json.loads((folder / "answer_only_report.json").read_text())
    assert report["step0_mismatch"]["trust_fraction"] < 0.3 and report["step0_mismatch"]["mean"] < -5
    tok, lm = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = [json.loads(x) for x in (ASSETS / "eval.jsonl").read_text().splitlines()][:16]
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = lm.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(t.startswith("#") and "=" not in t for t in texts), texts
