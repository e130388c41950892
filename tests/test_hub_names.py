"""Model and data names that are not paths next to the config go to the hub, and an offline hub cache
(HF_HUB_CACHE with HF_HUB_OFFLINE=1) is honoured, as users with pre-downloaded models run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tropd_ds.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def cache_repo(hub: Path, kind: str, repo: str, files: Path) -> None:
    """A repository in the hub cache layout: refs/main -> snapshots/<commit>/<files>."""
    import shutil

    base = hub / f"{kind}s--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files, snapshot)
    (base / "refs").mkdir(parents=True)
    (base / "refs/main").write_text(snapshot.name)


def test_hub_ids_resolve_from_an_offline_cache(tmp_path):
    from tropd_ds.demo_models import build_llama
    from tropd_ds.demo_task import build_tokenizer

    tok = build_tokenizer()
    build_llama(tmp_path / "files/model", tok, hidden=32, layers=1, heads=2, mlp=64)
    (tmp_path / "files/data").mkdir(parents=True)
    (tmp_path / "files/data/train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    hub = tmp_path / "hub"
    cache_repo(hub, "model", "tiny-org/tiny-llama", tmp_path / "files/model")
    cache_repo(hub, "dataset", "tiny-org/tiny-sums", tmp_path / "files/data")
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "student": {
                    "path": "tiny-org/tiny-llama",
                    "ds_config": str(ROOT / "ds_configs/cpu_student_zero3.json"),
                },
                "teacher": {
                    "path": "tiny-org/tiny-llama",
                    "ds_config": str(ROOT / "ds_configs/cpu_teacher_zero3_offload.json"),
                },
                # the tiny models have 128 positions: prompt + response must fit (checked before the engines)
                "data": {"path": "tiny-org/tiny-sums", "eval_path": "tiny-org/tiny-sums", "max_prompt_tokens": 32},
                "rollout": {"guidance": False, "prompts_per_step": 4, "samples_per_prompt": 1},
                "objective": {"name": "opd", "options": {}},
            }
        )
    )
    cfg = load_config(config)
    assert cfg.student.path == "tiny-org/tiny-llama" and cfg.data.path == "tiny-org/tiny-sums"  # kept as hub ids
    assert Path(cfg.checkpoint.dir).is_absolute()  # outputs still resolve against the config
    missing = tmp_path / "missing.yaml"
    missing.write_text(config.read_text().replace("tiny-org/tiny-llama", "tiny-org/absent", 1))
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    code = f"""
from tropd_ds.config import ConfigError, load_config
from tropd_ds.preflight import validate_before_engines
tok, n, rows, ev, obj, _ = validate_before_engines(load_config({str(config)!r}), world=1)
print(n, len(rows), rows.column_names)
try:
    validate_before_engines(load_config({str(missing)!r}), world=1)
except ConfigError as exc:
    print("ERROR", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if not line.startswith("[tropd-ds] ")]
    assert "[tropd-ds] warning: 8 of the 8 held-out prompts (data.eval_path) are also training" in proc.stdout
    vocab, rows, columns = printed[0].split(" ", 2)
    assert (vocab, rows, columns) == (str(len(tok)), "8", "['prompt', 'answer']")  # all 8 rows of the cached set
    assert (
        "ERROR student.path='tiny-org/absent' is not a local folder" in proc.stdout
        and "HF_HUB_OFFLINE=1" in proc.stdout
    )


def test_a_relative_path_next_to_the_config_stays_a_path(tmp_path):
    (tmp_path / "models/student").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text("student: {path: models/student}\ndata: {path: data.jsonl}\n")
    cfg = load_config(config)
    assert cfg.student.path == str((tmp_path / "models/student").resolve())
    assert cfg.data.path == str((tmp_path / "data.jsonl").resolve())  # a file name is never a hub id
    with pytest.raises(ConfigError):
        from tropd_ds.models import check_model_folder

        check_model_folder(load_config(config, ["student.path=../nope/student"]).student, "student")
