"""A wheel of the package is whole: its code, the presets, model shapes and DeepSpeed configs (inside the
package, tropd_ds/_shipped/), found by `tropd-ds plan` and `tropd-ds config --presets` when the package runs
from the wheel alone, away from any clone."""

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
def unpacked_wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (wheel,) = out.glob("tropd_ds-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    return site, names


def run_from(site: Path, cwd: Path, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # before site-packages, where this checkout is installed in editable mode
    code = "import sys, tropd_ds, tropd_kernels; print(tropd_ds.__file__, tropd_kernels.__file__, file=sys.stderr);"
    code += "from tropd_ds.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_wheel_carries_the_code_the_presets_the_model_shapes_and_the_deepspeed_configs(unpacked_wheel):
    _, names = unpacked_wheel
    for path in ("tropd_ds/cli.py", "tropd_ds/kv_cache.py", "tropd_kernels/vocab_pass_triton.py",
                 "tropd_kernels/ops/token_terms.py", "tropd_ds/_shipped/configs/demo.yaml",
                 "tropd_ds/_shipped/configs/models/qwen2.5-72b/config.json",
                 "tropd_ds/_shipped/configs/presets/llama70b_to_llama8b_1x8.yaml",
                 "tropd_ds/_shipped/ds_configs/teacher_zero3_offload_nvme.json"):  # fmt: skip
        assert path in names, path


def test_plan_and_the_presets_work_from_the_wheel_alone(unpacked_wheel, tmp_path):
    site, _ = unpacked_wheel
    shown = run_from(site, tmp_path, "config", "--presets")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"{site}/tropd_ds/__init__.py" in shown.stderr and f"{site}/tropd_kernels/__init__.py" in shown.stderr
    preset = site / "tropd_ds/_shipped/configs/presets/qwen72b_to_qwen7b_1x8.yaml"
    assert f"  {preset}" in shown.stdout and str(site / "tropd_ds/_shipped/ds_configs") in shown.stdout
    by_name = run_from(site, tmp_path, "plan", "--student", "qwen2.5-7b", "--teacher", "qwen2.5-72b", "--json")
    assert by_name.returncode in (0, 1), by_name.stderr[-3000:]  # 1: does not fit (with these defaults it does)
    assert json.loads(by_name.stdout)["student"]["vocab"] == 152064
    from_preset = run_from(site, tmp_path, "plan", "--config", str(preset))  # its ../../ds_configs paths resolve
    assert from_preset.returncode == 0, from_preset.stdout[-2000:] + from_preset.stderr[-3000:]
    assert "verdict: fits" in from_preset.stdout
