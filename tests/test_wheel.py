"""A wheel of the package is whole: built from this checkout and installed into a folder of its own, its
`tropd-ds` command answers --version, config --list and --presets, and plans a shipped preset by name and by
path from outside the checkout (the presets, model shapes and DeepSpeed configs ship as tropd_ds/_shipped/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The wheel built from this checkout and installed (pip, --no-deps) into a fresh folder of its own; the
    dependencies are this environment's. Returns (the folder, the wheel's file names)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (wheel,) = out.glob("tropd_ds-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    site = out / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return site, names


def run_from(site: Path, cwd: Path, *args):
    """The installed `tropd-ds` command, from a folder outside the checkout, with the installed package first
    on the path (before site-packages, where this checkout is installed in editable mode)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    cmd = [str(site / "bin" / "tropd-ds"), *args] if args[0] != "-c" else [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_the_code_the_presets_the_model_shapes_and_the_deepspeed_configs(installed_wheel):
    _, names = installed_wheel
    for path in ("tropd_ds/cli.py", "tropd_ds/kv_cache.py", "tropd_kernels/vocab_pass_triton.py",
                 "tropd_kernels/ops/token_terms.py", "tropd_ds/_shipped/configs/demo.yaml",
                 "tropd_ds/_shipped/configs/models/qwen2.5-72b/config.json",
                 "tropd_ds/_shipped/configs/presets/llama70b_to_llama8b_1x8.yaml",
                 "tropd_ds/_shipped/ds_configs/teacher_zero3_offload_nvme.json"):  # fmt: skip
        assert path in names, path


def test_the_installed_command_runs_plan_by_preset_name_and_lists_the_config_from_outside_the_checkout(
    installed_wheel, tmp_path
):
    site, _ = installed_wheel
    version = run_from(site, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip() == "tropd-ds 0.1.0", version.stderr[-2000:]
    listed = run_from(site, tmp_path, "config", "--list")
    assert listed.returncode == 0 and "rollout.max_new_tokens" in listed.stdout, listed.stderr[-2000:]
    shown = run_from(site, tmp_path, "config", "--presets")
    assert shown.returncode == 0, shown.stderr[-3000:]
    # the package that answers is the installed one, not this checkout
    origin = run_from(
        site, tmp_path, "-c", "import tropd_ds, tropd_kernels; print(tropd_ds.__file__, tropd_kernels.__file__)"
    )
    assert origin.stdout.split() == [f"{site}/tropd_ds/__init__.py", f"{site}/tropd_kernels/__init__.py"], origin
    preset = site / "tropd_ds/_shipped/configs/presets/qwen72b_to_qwen7b_1x8.yaml"
    assert f"  {preset}" in shown.stdout and str(site / "tropd_ds/_shipped/ds_configs") in shown.stdout
    by_name = run_from(site, tmp_path, "plan", "--student", "qwen2.5-7b", "--teacher", "qwen2.5-72b", "--json")
    assert by_name.returncode in (0, 1), by_name.stderr[-3000:]  # 1: does not fit (with these defaults it does)
    assert json.loads(by_name.stdout)["student"]["vocab"] == 152064
    for spec in ("qwen72b_to_qwen7b_1x8", str(preset)):  # by name, and by path (its ../../ds_configs resolve)
        planned = run_from(site, tmp_path, "plan", "--config", spec)
        assert planned.returncode == 0, planned.stdout[-2000:] + planned.stderr[-3000:]
        assert "verdict: fits" in planned.stdout and "qwen2.5-72b" in planned.stdout
    unknown = run_from(site, tmp_path, "plan", "--config", "qwen_1x8")
    assert unknown.returncode == 2 and "nor a shipped preset's name (presets: llama70b_to_llama8b_1x8" in unknown.stderr
