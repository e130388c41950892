"""A LoRA student on 2 CPU ranks under the real launcher: only the adapters train, resume is exact, the
merged export generates what the adapted model generates, and `tropd-ds export` writes either form.
(The adapters' ZeRO-3 update against a single-process PEFT step: tests/test_zero3_student.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import launch, records, write_config
from safetensors.torch import load_file

CLI = str(Path(sys.executable).with_name("tropd-ds"))
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}
KEYS = ("loss", "grad_norm", "trust_fraction", "response_len", "lr")


@pytest.fixture(scope="module")
def lora_runs(workspace):
    """A 4-step LoRA run with checkpoints at steps 2 and 4; then a second launch that resumes a copy of its
    step-2 checkpoint and runs steps 3-4 again."""
    common = dict(student={"lora": LORA}, optim={"steps": 4, "lr": 5e-3})
    launch(write_config(workspace, "lora_full", checkpoint={"every": 2, "keep_last": 2}, **common))
    copy = workspace / "lora_resumed/ckpt"
    copy.mkdir(parents=True)
    shutil.copytree(workspace / "lora_full/ckpt/step2", copy / "step2")
    shutil.copy(workspace / "lora_full/ckpt/run.json", copy / "run.json")
    (copy / "latest").write_text("step2")
    resumed = launch(write_config(workspace, "lora_resumed", checkpoint={"every": 0}, **common))
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    return workspace / "lora_full", workspace / "lora_resumed"


def test_a_lora_run_trains_only_the_adapters_and_resumes_exactly(workspace, lora_runs):
    full, resumed = ({r["step"]: r for r in records(run) if "loss" in r} for run in lora_runs)
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in KEYS:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert full[1]["run_config"]["student"]["lora"] == LORA
    # the merged export differs from the base only in the adapted weights
    base, merged = (
        load_file(workspace / "student/model.safetensors"),
        load_file(lora_runs[0] / "export/model.safetensors"),
    )
    assert sorted(base) == sorted(merged)
    moved = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert moved and all(any(t in k for t in LORA["target_modules"]) for k in moved), moved


def test_the_merged_export_generates_what_the_adapted_model_generates(workspace, lora_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = lora_runs[0] / "export"
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "student"), export / "adapter")
    adapted.eval()
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor(
        [tok("3+4+5=", add_special_tokens=False)["input_ids"], tok("9-2+6=", add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        want = adapted.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        got = merged.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(got, want)
    base = AutoModelForCausalLM.from_pretrained(workspace / "student").eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, merged(ids).logits)  # the adapters did something


def test_export_writes_the_merged_model_or_the_adapter_alone(workspace, lora_runs, tmp_path, capsys):
    run = lora_runs[0]
    config = str(workspace / "lora_full.yaml")
    for flags, out in (([], tmp_path / "merged"), (["--adapter-only"], tmp_path / "adapter")):
        proc = subprocess.run([CLI, "export", "--config", config, "--out", str(out), *flags], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = load_file(tmp_path / "merged/model.safetensors"), load_file(run / "export/model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    a, b = (
        load_file(tmp_path / "adapter/adapter_model.safetensors"),
        load_file(run / "export/adapter/adapter_model.safetensors"),
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "adapter/adapter_config.json").is_file() and not (
        tmp_path / "adapter/model.safetensors"
    ).exists()
    # the checkpoint holds adapters: a config without student.lora cannot export it
    from tropd_ds import cli

    code = cli.main(["export", "--config", config, "--set", "student.lora={}", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "holds LoRA adapters but the config's student.lora is {}" in err, err


def test_eval_of_the_adapter_folder_equals_eval_of_the_merged_export(workspace, lora_runs, tmp_path):
    export, data = lora_runs[0] / "export", str(workspace / "data/eval.jsonl")
    results = []
    for folder in (export, export / "adapter"):
        out = tmp_path / f"{folder.name}.jsonl"
        proc = subprocess.run([CLI, "eval", str(folder), "--data", data, "--max-prompts", "8", "--max-new-tokens", "12",
                               "--records", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append([json.loads(x)["completions"] for x in out.read_text().splitlines()])
    assert results[0] == results[1] and len(results[0]) == 8
