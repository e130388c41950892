"""`tropd-ds train --dry-run`: the 70B/72B presets check out on the meta device in seconds, and
configuration errors are found there, before any weight is loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tropd_ds.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs/presets"


def dry(capsys, config: Path, *args: str) -> tuple[int, str, str]:
    code = train_main(["--config", str(config), "--dry-run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "preset,world,params",
    [
        ("llama70b_to_llama8b_1x8.yaml", 8, ("8.03 B", "70.55 B")),
        ("qwen72b_to_qwen7b_2x8.yaml", 16, ("7.62 B", "72.71 B")),
    ],
)
def test_presets_check_out_on_the_meta_device_in_seconds(capsys, preset, world, params):
    start = time.perf_counter()
    code, out, err = dry(capsys, PRESETS / preset, "--world-size", str(world))
    assert code == 0, out + err
    assert time.perf_counter() - start < 60
    assert f"ok  student on the meta device: {params[0]} parameters (bfloat16)" in out
    assert f"ok  teacher on the meta device: {params[1]} parameters (bfloat16)" in out
    assert f"{world} ranks: {512 // world} rollouts per rank" in out and "top-64" in out
    assert f"memory plan for {world} GPUs of 80 GiB" in out and "-> fits" in out
    assert "no weights loaded" in out


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective.options={k: 200000}"], "objective.options.k=200000 exceeds the vocabulary (128256 tokens)"),
        (["student.dtype=float32"], "enables bf16 but student.dtype='float32': expected student.dtype='bfloat16'"),
        (["rollout.max_new_tokens=140000"], "more than the student's 131072 positions"),
        (["student.micro_batch_size=3"], "student.micro_batch_size=3 does not divide the 64 rollouts per rank"),
        (["optim.lr=1e-5"], "optimizer.params.lr=5e-06 contradicts optim.lr=1e-05"),
        (["rollout.prompts_per_step=100"], "rollout.prompts_per_step=100: expected a multiple of the 8 ranks"),
        (["data.path=/nowhere/prompts.jsonl"], "data.path='/nowhere/prompts.jsonl' does not exist"),
    ],
)
def test_configuration_errors_are_found_before_any_weight(capsys, overrides, message):
    args = [x for o in overrides for x in ("--set", o)]
    code, out, err = dry(capsys, PRESETS / "llama70b_to_llama8b_1x8.yaml", "--world-size", "8", *args)
    assert code == 2 and message in err, out + err


def test_deepspeed_rejects_a_bad_engine_config_in_the_dry_run(capsys, tmp_path):
    bad = json.loads((ROOT / "ds_configs/teacher_zero3_offload_cpu.json").read_text())
    bad["zero_optimization"]["stage3_prefetch_bucket_size"] = "large"
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(bad))
    code, out, err = dry(
        capsys, PRESETS / "llama70b_to_llama8b_1x8.yaml", "--world-size", "8", "--set", f"teacher.ds_config={path}"
    )
    assert (
        code == 2
        and "teacher.ds_config=" in err
        and "DeepSpeed rejects it" in err
        and "stage3_prefetch_bucket_size" in err
    ), err


def test_training_on_config_only_folders_says_weights_are_missing(capsys):
    code = train_main(["--config", str(PRESETS / "qwen72b_to_qwen7b_1x8.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "has a config.json but no weights" in err and "--dry-run" in err, err
