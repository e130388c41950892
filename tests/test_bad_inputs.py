"""Bad inputs, table-driven: each is refused before any engine starts, with exit code 2, an error that
names the bad value and what is accepted, no traceback, and nothing written to the run's folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch import ROOT, write_config

from tropd_ds import cli, command, ownership
from tropd_ds.config import ConfigError
from tropd_ds.data import PromptStream, load_rows


def copy_model(workspace: Path, tmp: Path, role: str = "student") -> Path:
    out = tmp / f"{role}_copy"
    shutil.copytree(workspace / role, out)
    return out


def write_rows(tmp: Path, rows: list, name: str = "rows.jsonl") -> Path:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_checkpoint(root: Path, step: int = 3, identity: dict | None = None) -> None:
    folder = root / f"step{step}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": step, "world_size": 1, "files": {}}))
    (root / "latest").write_text(f"step{step}")
    if identity is not None:
        (root / "run.json").write_text(json.dumps(identity))


def identity_of(config: Path, *overrides: str, world: int = 1) -> dict:
    from tropd_ds.config import load_config

    return ownership.run_identity(load_config(config, list(overrides)), world)


def _monitor_without_package(ws, tmp, config):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the missing-extra message cannot show")
    ds = json.loads((ROOT / "ds_configs/cpu_student_zero3.json").read_text())
    ds["wandb"] = {"enabled": True, "project": "tropd"}
    path = tmp / "ds_wandb.json"
    path.write_text(json.dumps(ds))
    return config, [f"student.ds_config={path}"], ['"wandb": {"enabled": true}', "pip install 'tropd-ds[wandb]'"]


def _student_copy(ws, tmp, edit) -> Path:
    """A copy of the workspace student with `edit(folder)` applied: the teacher stays as it is."""
    folder = tmp / "student_copy"
    shutil.copytree(ws / "student", folder)
    edit(folder)
    return folder


def _edit_json(folder: Path, name: str, **changes) -> None:
    data = json.loads((folder / name).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / name).write_text(json.dumps(data))


def _no_end_token(ws, tmp, config):
    def edit(folder):
        _edit_json(folder, "tokenizer_config.json", eos_token=None)
        _edit_json(folder, "generation_config.json", eos_token_id=None)
        _edit_json(folder, "config.json", eos_token_id=None)

    teacher = _student_copy(ws, tmp, edit).rename(tmp / "teacher_copy")  # both models lack one
    shutil.copytree(teacher, tmp / "student_copy")
    for name in ("config.json", "model.safetensors"):  # the teacher keeps its own weights and shape
        shutil.copy(ws / "teacher" / name, teacher / name)
    _edit_json(teacher, "config.json", eos_token_id=None)
    overrides = [f"student.path={tmp / 'student_copy'}", f"teacher.path={teacher}"]
    return config, overrides, ["no end-of-sequence token", "set eos_token in tokenizer_config.json"]


def _no_tokenizer_files(ws, tmp, config):
    folder = _student_copy(ws, tmp, lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")])
    return config, [f"student.path={folder}"], ["has no tokenizer files", "tokenizer.save_pretrained(folder)"]


def _template(source: str, words: list[str]):
    def case(ws, tmp, config):
        folder = _student_copy(ws, tmp, lambda f: _edit_json(f, "tokenizer_config.json", chat_template=source))
        teacher = tmp / "teacher_copy"
        shutil.copytree(ws / "teacher", teacher)
        _edit_json(teacher, "tokenizer_config.json", chat_template=source)
        return config, [f"student.path={folder}", f"teacher.path={teacher}", "data.chat_template=true"], words

    return case


def _missing_shard(ws, tmp, config):
    def edit(folder):
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        shards = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(shards))

    folder = _student_copy(ws, tmp, edit)
    return config, [f"student.path={folder}"], ["model.safetensors.index.json names 2 weight files and 1 are missing",
                                                 "model-00002-of-00002.safetensors"]  # fmt: skip


def _not_utf8(ws, tmp, config):
    path = tmp / "latin1.jsonl"
    path.write_bytes('{"prompt": "1+2="}\n{"prompt": "caf\u00e9 4+1="}\n'.encode("latin-1"))
    return config, [f"data.path={path}", "rollout.guidance=false"], ["line 2 (column 16) is not UTF-8", "0xe9"]


# Each case: name -> function(workspace, tmp, config) returning (config path, overrides, words of the error).
def _yaml_syntax(ws, tmp, config):
    bad = tmp / "run.yaml"
    bad.write_text(config.read_text() + "optim: {steps: 3, lr: [1e-3\n")
    return bad, [], [f"{bad}:", "YAML syntax error"]


def _json_syntax(ws, tmp, config):
    bad = tmp / "run.json"
    bad.write_text('{"optim": {"steps": 3,}}')
    return bad, [], [f"{bad}:1:", "JSON syntax error"]


def _set(*overrides_and_words):
    *overrides, words = overrides_and_words
    return lambda ws, tmp, config: (config, list(overrides), words)


def _truncated_weights(ws, tmp, config):
    model = copy_model(ws, tmp)
    path = model / "model.safetensors"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return config, [f"student.path={model}"], ["model.safetensors cannot be read", "Download"]


def _invalid_model_config(ws, tmp, config):
    model = copy_model(ws, tmp, "teacher")
    (model / "config.json").write_text('{"model_type": "llama", ')
    return config, [f"teacher.path={model}"], ["config.json:1:", "is not valid JSON"]


def _embedding_shape(ws, tmp, config):
    model = copy_model(ws, tmp)
    cfg = json.loads((model / "config.json").read_text())
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    (model / "config.json").write_text(json.dumps(cfg))
    return config, [f"student.path={model}"], ["embed_tokens.weight of shape", "different models"]


def _rows(rows, words, field="data.path"):
    return lambda ws, tmp, config: (config, [f"{field}={write_rows(tmp, rows)}", "rollout.guidance=false"], words)


def _messages_without_template(ws, tmp, config):
    rows = [{"prompt": [{"role": "user", "content": "1+2="}], "teacher_response": "1+2=3;#3"}]
    return config, [f"data.path={write_rows(tmp, rows)}"], ["row 0", "no chat template"]


def _stage_as_string(ws, tmp, config):
    ds = json.loads((ROOT / "ds_configs/cpu_student_zero3.json").read_text())
    ds["zero_optimization"]["stage"] = "3"
    path = tmp / "ds.json"
    path.write_text(json.dumps(ds))
    return config, [f"student.ds_config={path}"], ["zero_optimization.stage='3'", "a JSON str", "expected 3"]


def _export_dir_not_an_export(ws, tmp, config):
    out = tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    return config, [f"checkpoint.export_dir={out}"], ["is not empty (notes.txt)", "checkpoint.overwrite=true"]


def _fresh_run_among_checkpoints(ws, tmp, config):
    ckpt = tmp / "old_ckpt"
    fake_checkpoint(ckpt)
    return config, [f"checkpoint.dir={ckpt}", "checkpoint.resume=false"], ["holds another run's checkpoints", "step3"]


def _resume_with_another_objective(ws, tmp, config):
    ckpt = tmp / "opd_ckpt"
    fake_checkpoint(ckpt, identity=identity_of(config, "objective.name=opd", "objective.options={}"))
    return config, [f"checkpoint.dir={ckpt}"], ["objective.name: 'opd' -> 'tropd'", "checkpoint.overwrite=true"]


def _resume_on_other_ranks(ws, tmp, config):
    ckpt = tmp / "two_rank_ckpt"
    fake_checkpoint(ckpt, identity=identity_of(config, world=2))
    return config, [f"checkpoint.dir={ckpt}"], ["ranks: 2 -> 1", "launch with 2 ranks"]


def _output_under_a_file(ws, tmp, config):
    (tmp / "afile").write_text("x")
    return config, [f"logging.dir={tmp / 'afile' / 'logs'}"], ["logging.dir=", "is a file, expected a folder"]


def _empty_data_folder(ws, tmp, config):
    (tmp / "empty_data").mkdir()
    return config, [f"data.path={tmp / 'empty_data'}"], ["is an empty folder"]


CASES = {
    "empty data folder": _empty_data_folder,
    "seed too large": _set("seed=18446744073709551616", ["seed=18446744073709551616: expected an integer in [0"]),
    "split of a file": _set("data.split=test", ["data.split='test' with the file", "holds one split"]),
    "yaml syntax": _yaml_syntax,
    "json syntax": _json_syntax,
    "lr inf": _set("optim.lr=.inf", ["optim.lr=inf: expected a number > 0"]),
    "temperature inf": _set("rollout.temperature=.inf", ["rollout.temperature=inf"]),
    "betas out of range": _set("optim.betas=[0.9, 1.5]", ["optim.betas=[0.9, 1.5]", "in [0, 1)"]),
    "empty export dir": _set("checkpoint.export_dir=", ["checkpoint.export_dir is empty", "current directory"]),
    "empty logging dir": _set("logging.dir=", ["logging.dir is empty"]),
    "export into the student": lambda ws, tmp, config: (
        config,
        [f"checkpoint.export_dir={ws / 'student'}"],
        ["the student's model folder", "write over the model"],
    ),
    "logs inside the teacher": lambda ws, tmp, config: (
        config,
        [f"logging.dir={ws / 'teacher' / 'logs'}"],
        ["inside the teacher's model folder"],
    ),
    "two outputs in one folder": lambda ws, tmp, config: (
        config,
        [f"logging.dir={tmp / 'same'}", f"checkpoint.dir={tmp / 'same'}"],
        ["are the same folder"],
    ),
    "truncated weights": _truncated_weights,
    "no end-of-sequence token": _no_end_token,
    "no tokenizer files": _no_tokenizer_files,
    "chat template with a syntax error": _template(
        "{% for m in messages %}{{ m.content }", ["data.path row 0: the tokenizer's chat template fails", "unexpected"]
    ),
    "chat template that raises": _template(
        "{{ raise_exception('no system turn') }}", ["TemplateError: no system turn", "data.chat_template=false"]
    ),
    "chat template that renders nothing": _template(
        "{% if false %}x{% endif %}", ["data.path row 0: the prompt renders to no tokens through the chat template"]
    ),
    "a missing weight shard": _missing_shard,
    "a row that is not UTF-8": _not_utf8,
    "invalid model config": _invalid_model_config,
    "embedding shape": _embedding_shape,
    "null prompt": _rows([{"prompt": "1+2="}, {"prompt": None}], ["data.path row 1", "prompt=None"]),
    "number prompt": _rows([{"prompt": "1+2="}, {"prompt": 12}], ["data.path row 1", "prompt=12 (int)"]),
    "empty prompt": _rows([{"prompt": ""}], ["data.path row 0", "expected a non-empty string"]),
    "messages without chat template": _messages_without_template,
    "chat_template without a template": _set(
        "data.chat_template=true", ["data.chat_template=true", "no chat template"]
    ),
    "response not a string": _rows(
        [{"prompt": "1+2=", "teacher_response": 3}], ["row 0: teacher_response=3 (int)", "a string or null"]
    ),
    "eval answer missing": _rows(
        [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": None}],
        ["data.eval_path row 1", "answer is None"],
        "data.eval_path",
    ),
    "every prompt skipped": _set(
        "data.max_prompt_tokens=2", "data.long_prompts=skip", ["every one of the 200 prompts", "long_prompts=truncate"]
    ),
    "longer than the positions": _set(
        "rollout.max_new_tokens=120", "eval.max_new_tokens=12", ["is 152 tokens", "student's 128 positions"]
    ),
    "deepspeed stage as a string": _stage_as_string,
    "export dir holds user files": _export_dir_not_an_export,
    "fresh run among old checkpoints": _fresh_run_among_checkpoints,
    "resume with another objective": _resume_with_another_objective,
    "resume on another number of ranks": _resume_on_other_ranks,
    "output under a file": _output_under_a_file,
    # what users plug in
    "lora target matching nothing": _set(
        "student.lora={r: 4, target_modules: [qkv_proj]}",
        ["target_modules=['qkv_proj'] matches no module", "q_proj", "v_proj"],
    ),
    "lora on the output head": _set("student.lora={target_modules: [lm_head]}", ["the output head 'lm_head'"]),
    "lora unknown key": _set("student.lora={rank: 4}", ["student.lora has unknown keys ['rank']", "r, alpha"]),
    "lora rank zero": _set("student.lora={r: 0}", ["student.lora.r=0: expected an integer >= 1"]),
    "lora on the teacher": _set("teacher.lora={r: 4}", ["'teacher.lora'", "the student only"]),
    "missing prompt column": _set("data.prompt_column=question", ["has columns", "'question' (data.prompt_column)"]),
    "missing answer column": _set(
        "data.answer_column=solution", ["data.eval_path=", "answer column 'solution' (data.answer_column)"]
    ),
    "template keyword tropd-ds sets": _set(
        "data.chat_template_kwargs={add_generation_prompt: false}", ["sets 'add_generation_prompt'"]
    ),
    "unknown schedule": _set(
        "optim.schedule=cosine_annealing", ["optim.schedule='cosine_annealing'", "cosine_with_min_lr"]
    ),
    "schedule argument it lacks": _set(
        "optim.schedule=linear",
        "optim.min_lr_ratio=1",
        "optim.schedule_kwargs={power: 2}",
        ["optim.schedule='linear'", "power"],
    ),
    "min_lr_ratio on another schedule": _set(
        "optim.schedule=linear", "optim.min_lr_ratio=0.1", ["optim.min_lr_ratio=0.1", "cosine_with_min_lr"]
    ),
    "avg@n with greedy decoding": _set("eval.samples=4", ["eval.samples=4 with eval.temperature=0"]),
    "answer pattern that is no regex": _set("eval.answer_pattern=#([0-9]+", ["eval.answer_pattern='#([0-9]+'"]),
    "answer pattern with two groups": _set(
        "eval.answer_pattern=(#)([0-9]+)", ["eval.answer_pattern='(#)([0-9]+)' has 2 groups"]
    ),
    "wandb monitor without wandb": _monitor_without_package,
    "collective time-out zero": _set(
        "collective_timeout_minutes=0", ["collective_timeout_minutes=0.0: expected a number of minutes > 0"]
    ),
    "collective time-out negative": _set("collective_timeout_minutes=-5", ["collective_timeout_minutes=-5.0"]),
    "collective time-out nan": _set("collective_timeout_minutes=.nan", ["collective_timeout_minutes=nan"]),
    "collective time-out not a number": _set("collective_timeout_minutes=4h", ["collective_timeout_minutes='4h'"]),
    "teacher prefixes from an offloaded teacher layer by layer": _set(
        "rollout.prefix_source=teacher",
        "teacher.gather_params=false",
        [
            "rollout.prefix_source='teacher'",
            "teacher.gather_params=false",
            "offload_param.device='cpu'",
            "rollout.prefix_source=data",
            "teacher.gather_params=true",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_any_engine(workspace, tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    run_dir = tmp_path / "run"
    config = write_config(
        workspace,
        f"bad_{case.replace(' ', '_')}",
        checkpoint={"dir": str(run_dir / "ckpt"), "export_dir": str(run_dir / "export")},
        logging={"dir": str(run_dir / "logs")},
    )
    path, overrides, words = CASES[case](workspace, tmp_path, config)
    argv = ["--config", str(path)] + [x for o in overrides for x in ("--set", o)]
    assert command.prepare(argv) == 2
    err = capsys.readouterr().err
    assert "tropd-ds: configuration error: " in err, err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
    assert not run_dir.exists(), sorted(str(p) for p in run_dir.rglob("*"))  # nothing written


def test_a_good_config_passes_and_claims_its_folder_with_identity_and_lock(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    config = write_config(workspace, "good", checkpoint={"dir": str(tmp_path / "ckpt")})
    cfg, _ = command.prepare(["--config", str(config)])
    lock = json.loads((tmp_path / "ckpt/run.lock").read_text())
    assert lock["pid"] == os.getpid()
    assert json.loads((tmp_path / "ckpt/run.json").read_text())["objective.name"] == "tropd"
    ownership.release_lock(cfg.checkpoint.dir)
    assert not (tmp_path / "ckpt/run.lock").exists()
    assert command.prepare(["--config", str(config), "--dry-run", "--world-size", "0"]) == 2
    assert "--world-size=0: expected an integer >= 1" in capsys.readouterr().err


def test_a_live_lock_is_refused_and_a_dead_ones_lock_replaced(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    import socket

    import psutil

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = write_config(workspace, "locked", checkpoint={"dir": str(ckpt)})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        started = psutil.Process(other.pid).create_time()
        (ckpt / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": started}))
        assert command.prepare(["--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {other.pid} on this machine" in err, err
    finally:
        other.kill()
        other.wait()
    cfg, _ = command.prepare(["--config", str(config)])  # that process has ended: its lock is stale
    assert f"removed a stale lock of pid {other.pid}" in capsys.readouterr().out
    assert json.loads((ckpt / "run.lock").read_text())["pid"] == os.getpid()
    ownership.release_lock(cfg.checkpoint.dir)


def _claim(root: str, start: float, queue) -> None:
    import time

    from tropd_ds.config import ConfigError as Refused

    time.sleep(max(0.0, start - time.time()))  # both processes claim at the same instant
    try:
        ownership.take_lock(Path(root), log=lambda msg: None)
        queue.put("won")
        time.sleep(1.0)  # hold the lock while the other decides
    except Refused as exc:
        queue.put(f"refused: {exc}")
    except Exception as exc:  # noqa: BLE001  (what the test is about: no other way out)
        queue.put(f"crashed: {type(exc).__name__}: {exc}")


def test_two_runs_replacing_a_stale_lock_at_once_give_one_winner_and_one_clear_refusal(tmp_path):
    """The lock used to be checked and then written under a shared temporary name: two claims of a stale lock
    at the same instant both passed, and one died on the other's temporary file. Now it is taken with O_EXCL."""
    import multiprocessing
    import socket
    import time

    ctx = multiprocessing.get_context("spawn")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for trial in range(6):
        root = tmp_path / f"ckpt{trial}"
        root.mkdir()
        stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": 1.0}
        if trial % 2:  # and with no lock at all
            (root / "run.lock").write_text(json.dumps(stale))
        queue = ctx.Queue()
        start = time.time() + 3.0
        procs = [ctx.Process(target=_claim, args=(str(root), start, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert results[0].startswith("refused: checkpoint.dir=") and results[1] == "won", results
        assert not [p.name for p in root.iterdir() if p.name != "run.lock"]  # no temporary files left behind


def test_a_run_owns_its_logging_and_export_folders_and_may_nest_them(workspace, tmp_path, monkeypatch, capsys):
    """A second run with its own checkpoint.dir but the first run's logging.dir or export_dir used to overwrite
    the first run's export and interleave two runs in one metrics.jsonl; a run whose checkpoint and logging
    folders lie inside its export folder could not resume itself. A user's file where the run keeps its
    resolved config is never written over."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    logs, export = tmp_path / "logs", tmp_path / "export"

    def prepare(name: str, **checkpoint_and_logging):
        sections = {
            "checkpoint": {"dir": str(tmp_path / name), "export_dir": str(export)},
            "logging": {"dir": str(logs)},
        }
        for key, value in checkpoint_and_logging.items():
            section, field = key.split("__")
            sections[section][field] = str(value)
        result = command.prepare(["--config", str(write_config(workspace, f"owns_{name}", **sections))])
        if not isinstance(result, int):
            ownership.release_lock(result[0].checkpoint.dir)
        return result

    assert not isinstance(prepare("first"), int)
    owner = json.loads((logs / "tropd_run.json").read_text())["checkpoint_dir"]
    assert owner == os.path.realpath(tmp_path / "first") == json.loads((export / "tropd_run.json").read_text())[
        "checkpoint_dir"]  # fmt: skip
    assert not isinstance(prepare("first"), int)  # the same run again: its own folders
    for key, value, words in (
        ("checkpoint__export_dir", tmp_path / "export2", f"logging.dir={str(logs)!r} belongs to another run"),
        ("logging__dir", tmp_path / "logs2", f"checkpoint.export_dir={str(export)!r} belongs to another run"),
    ):
        assert prepare("second", **{key: value}) == 2
        err = capsys.readouterr().err
        assert words in err and f"the one whose checkpoints are in {owner!r}" in err, err
    assert not isinstance(prepare("second", checkpoint__overwrite="true"), int)  # taken over when asked
    assert json.loads((logs / "tropd_run.json").read_text())["checkpoint_dir"] == os.path.realpath(tmp_path / "second")

    def layout(run: Path) -> dict:
        return dict(checkpoint__dir=run / "ckpt", logging__dir=run / "logs", checkpoint__export_dir=run / "export")

    assert not isinstance(prepare("whole", **layout(tmp_path / "whole")), int)
    shutil.copytree(tmp_path / "whole", tmp_path / "moved")  # a run folder moved or copied whole: the same run
    assert not isinstance(prepare("moved", **layout(tmp_path / "moved")), int), capsys.readouterr().err

    nest = tmp_path / "nest"  # checkpoints and logs inside the export folder, with a checkpoint to resume
    cfg_nest = dict(checkpoint__dir=nest / "ckpt", checkpoint__export_dir=nest, logging__dir=nest / "logs")
    assert not isinstance(prepare("nest", **cfg_nest), int)
    fake_checkpoint(nest / "ckpt", identity=json.loads((nest / "ckpt/run.json").read_text()))
    assert not isinstance(prepare("nest", **cfg_nest), int), capsys.readouterr().err
    (nest / "notes.txt").write_text("the user's own file")  # but not a file of the user's
    assert prepare("nest", **cfg_nest) == 2 and "is not empty (notes.txt)" in capsys.readouterr().err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "resolved_config.json").write_text('{"my": "notes"}')
    assert prepare("third", logging__dir=mine, checkpoint__export_dir=tmp_path / "export3") == 2
    err = capsys.readouterr().err
    assert "holds resolved_config.json, which is not a resolved config tropd-ds wrote" in err, err
    assert (mine / "resolved_config.json").read_text() == '{"my": "notes"}'


def test_overwrite_deletes_another_runs_checkpoints_only_when_asked(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ckpt = tmp_path / "ckpt"
    config = write_config(workspace, "overwrite", checkpoint={"dir": str(ckpt)})
    fake_checkpoint(ckpt, identity=identity_of(config, "seed=5"))
    assert command.prepare(["--config", str(config)]) == 2
    assert "seed: 5 -> 0" in capsys.readouterr().err and (ckpt / "step3").is_dir()
    cfg, _ = command.prepare(["--config", str(config), "--set", "checkpoint.overwrite=true"])
    assert "deleting step3 in" in capsys.readouterr().out
    assert not (ckpt / "step3").exists() and not (ckpt / "latest").exists()
    assert json.loads((ckpt / "run.json").read_text())["seed"] == 0
    ownership.release_lock(cfg.checkpoint.dir)


def test_resume_refuses_what_changed_and_logs_what_may_change(workspace, tmp_path, monkeypatch, capsys):
    """A resume used to ignore a new optim.lr (DeepSpeed restores the scheduler's base rates), replaced teacher
    weights, an edited data file and a damaged run.json. Now every setting that changes what the run computes
    and the content of both models and the data are the run's identity; eval, logging, checkpoint cadence,
    memory settings and optim.steps upward may change and are logged."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ckpt, teacher, data = tmp_path / "ckpt", tmp_path / "teacher", tmp_path / "train.jsonl"
    shutil.copytree(workspace / "teacher", teacher)
    shutil.copy(workspace / "data/train.jsonl", data)
    config = write_config(
        workspace, "changed", checkpoint={"dir": str(ckpt)}, data={"path": str(data)}, teacher={"path": str(teacher)}
    )

    def refused(*overrides: str) -> str:
        assert command.prepare(["--config", str(config), *[a for o in overrides for a in ("--set", o)]]) == 2
        assert (ckpt / "step3").is_dir()  # nothing deleted
        return capsys.readouterr().err

    fake_checkpoint(ckpt, identity=identity_of(config))
    for override, words in (
        ("optim.lr=2e-3", "optim.lr: 0.001 -> 0.002"),
        ("optim.steps=4", "optim.steps: 6 -> 4"),
        ("optim.warmup_steps=2", "optim.warmup_steps: 0 -> 2"),
        ("rollout.max_new_tokens=8", "rollout.max_new_tokens: 12 -> 8"),
        ("optim.weight_decay=0.1", "optim.weight_decay: 0.0 -> 0.1"),
    ):
        err = refused(override)
        assert words in err and "holds checkpoints of a run with another config" in err, err
    cfg, _ = command.prepare(["--config", str(config), "--set", "eval.every=2", "--set", "optim.steps=10",
                              "--set", "rollout.micro_batch_size=2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "resuming with settings changed that a resume may change: rollout.micro_batch_size: 0 -> 2; " in out, out
    assert "eval.every: 0 -> 2" in out and "optim.steps: 6 -> 10 (the schedule stretches)" in out
    ownership.release_lock(cfg.checkpoint.dir)
    assert json.loads((ckpt / "run.json").read_text())["optim.steps"] == 10  # the latest launch's settings

    (ckpt / "run.json").write_text(json.dumps(identity_of(config)))
    with open(data, "a") as f:  # a data file edited in place
        f.write(json.dumps({"prompt": "1+1=", "answer": "2", "teacher_response": "2"}) + "\n")
    assert f"the content of data.path ({data}) has changed" in refused()
    shutil.copy(workspace / "data/train.jsonl", data)
    import torch
    from transformers import AutoModelForCausalLM

    replaced = AutoModelForCausalLM.from_pretrained(teacher)  # new weights of the same shapes at the same path
    with torch.no_grad():
        next(replaced.parameters()).add_(1.0)
    replaced.save_pretrained(teacher)
    assert f"the content of teacher.path ({teacher}) has changed" in refused()

    (ckpt / "run.json").write_text(json.dumps(identity_of(config))[:40])  # cut short
    err = refused()
    assert "run.json is damaged (JSONDecodeError" in err and "checkpoint.overwrite=true" in err, err
    (ckpt / "run.json").unlink()
    assert "holds checkpoints (step3) but no run.json" in refused()


def test_a_prompt_stream_that_can_never_fill_a_step_ends_with_an_error(workspace, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "student")
    rows = load_rows(str(write_rows(tmp_path, [{"prompt": "1+2+3+4="}, {"prompt": "5+6+7+8="}])))
    stream = PromptStream(rows, tok, 2, 0, 1, 0, max_prompt_tokens=3, long_prompts="skip")
    with pytest.raises(ConfigError, match="every one of the 2 prompts is longer than data.max_prompt_tokens=3"):
        stream.next_batch()


def test_unknown_characters_are_a_warning_with_counts(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    rows = write_rows(tmp_path, [{"prompt": "1+x=", "teacher_response": "1+x=1;#1"}, {"prompt": "2+2="}])
    config = write_config(workspace, "unknown", checkpoint={"dir": str(tmp_path / "ckpt")})
    cfg, _ = command.prepare(["--config", str(config), "--set", f"data.path={rows}", "--set", "rollout.guidance=false"])
    out = capsys.readouterr().out
    assert "1 of 8 prompt tokens in 1 of 2 rows of data.path map to the tokenizer's unknown token '<pad>'" in out
    ownership.release_lock(cfg.checkpoint.dir)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["plan", "--student", "qwen2.5-7b", "--teacher", "llama-3.1-70b", "--tflops", "0"], "--tflops=0.0: expected"),
        (["plan", "--student", "qwen2.5-7b", "--teacher", "llama-3.1-70b", "--nodes", "0"], "--nodes=0: expected"),
        (["plan", "--student", "qwen2.5-7b", "--teacher", "llama-3.1-70b", "--mfu", "nan"], "--mfu=nan: expected"),
        (["plan", "--student", "qwen2.5-7b", "--teacher", "llama-3.1-70b", "--mfu", "2"], "expected a fraction"),
        (["plan", "--student", "qwen2.5-7b", "--teacher", "llama-3.1-70b", "--prompt-len", "-5"], "--prompt-len=-5"),
        (["plan", "--student", "qwen2.5-7b", "--teacher", "llama-3.1-70b", "--gpu-mem-gib", "inf"], "gpu-mem-gib=inf"),
        (["eval", "MODEL", "--data", "EVAL", "--max-prompts", "0"], "--max-prompts=0: expected an integer >= 1"),
        (["eval", "MODEL", "--data", "EVAL", "--temperature", "-1"], "--temperature=-1.0: expected a finite number"),
        (["eval", "MODEL", "--data", "EVAL", "--samples", "0"], "--samples=0"),
        (["eval", "MISSING", "--data", "EVAL"], "is not a model folder"),
        (["eval", "MODEL", "--data", "MISSING"], "does not exist"),
        (["export", "--config", "CONFIG", "--out", ""], "--out is empty"),
        (["export", "--config", "CONFIG", "--out", "FILE"], "is a file"),
        (["export", "--config", "CONFIG", "--out", "USERDIR"], "is not empty (notes.txt)"),
        (["export", "--config", "CONFIG", "--out", "MODEL"], "the student's model folder"),
        (["export", "--config", "CONFIG", "--out", "DANGLING"], "is a link to"),
        (["config", "--dump", "--config", "USERDIR"], "is a folder: expected a YAML or JSON run config file"),
        (["train"], "no --config given: pass a run config"),
    ],
)
def test_command_arguments_are_range_checked(workspace, tmp_path, capsys, argv, words):
    (tmp_path / "file").write_text("x")
    (tmp_path / "user").mkdir()
    (tmp_path / "user/notes.txt").write_text("mine")
    config = write_config(workspace, "cli_args", checkpoint={"dir": str(tmp_path / "ckpt")})
    names = {
        "MODEL": workspace / "student",
        "EVAL": workspace / "data/eval.jsonl",
        "CONFIG": config,
        "FILE": tmp_path / "file",
        "USERDIR": tmp_path / "user",
        "MISSING": tmp_path / "missing",
        "DANGLING": tmp_path / "dangling",
    }
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    code = cli.main([str(names.get(a, a)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert "Traceback" not in err
    assert (tmp_path / "user/notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path / "user")) == [
        "notes.txt"
    ]


def test_monitor_output_goes_under_the_runs_logging_dir(workspace, tmp_path):
    from tropd_ds.config import load_config
    from tropd_ds.engines import student_ds_config

    cfg = load_config(write_config(workspace, "monitor"))
    ds = student_ds_config(cfg.student, cfg.optim, 2, 1, cfg.logging.dir)
    assert ds["csv_monitor"]["output_path"] == str(Path(cfg.logging.dir) / "monitor")
    absolute = yaml.safe_load(json.dumps({"csv_monitor": {"enabled": True, "output_path": "/abs/where"}}))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**json.loads((ROOT / "ds_configs/cpu_student_zero3.json").read_text()), **absolute}))
    cfg.student.ds_config = str(path)
    assert (
        student_ds_config(cfg.student, cfg.optim, 2, 1, cfg.logging.dir)["csv_monitor"]["output_path"] == "/abs/where"
    )
