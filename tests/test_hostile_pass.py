"""A hostile pass (2026-11-30, docs/HOSTILE_PASS.md): bad and odd inputs to the pre-engine checks
(`tropd-ds train`, i.e. command.prepare, and its --dry-run) and to `tropd-ds plan | eval | export | config`,
table-driven and in-process. The rule for every case:

- bad input: exit code 2 (3 for a fault), with a message that names the bad value or file and what is accepted;
- valid input: success, and where it matters what it resolved to;
- never a traceback (an exception escaping prepare / cli.main, or 'Traceback' in the output), never a hang
  (each case runs under an alarm), and never a change to a user's file (the workspace models and data are
  fingerprinted around each case, and each case's own user files are compared byte for byte).

A case marked xfail(strict=True) fails the rule today: the case states the behaviour that is right, the mark
says what happens now. Everything is created under tmp_path; `tropd-ds train` is reached only through
command.prepare (or `cli.main(["train", ..., "--dry-run"])`), so no case starts an engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from launch import run_config

from tropd_ds import cli, command, ownership

CASE_SECONDS = 90  # a case that runs longer hangs (the slowest one takes about 5 s on 2 CPU cores)
LONG = "x" * 300  # longer than a file name may be (255 bytes on Linux file systems)
SET = "--set"


def sections(ws: Path, run: Path) -> dict:
    """The run config of tests/launch.py's write_config, with every output under `run`."""
    return run_config(ws, run)


class Ctx:
    """One case's world: the session workspace (read only), tmp_path, a good config at tmp/run.yaml, and the
    user files the case made (which must come out unchanged)."""

    def __init__(self, ws: Path, tmp: Path, monkeypatch):
        self.ws, self.tmp, self.mp = ws, tmp, monkeypatch
        self.run = tmp / "run"
        self.cfg = sections(ws, self.run)
        self.config = self.write_config("run.yaml")
        self.user: dict[Path, bytes] = {}
        self.cleanup: list[Callable] = []

    def write_config(self, name: str, cfg: dict | None = None) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg or self.cfg))
        return path

    def file(self, name: str, content: str | bytes) -> Path:
        """A user's file under tmp_path, kept as it is by every case."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        self.user[path] = path.read_bytes()
        return path

    def rows(self, rows: list, name: str = "rows.jsonl") -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def copy(self, source: Path, name: str) -> Path:
        """A copy of a workspace file or folder under tmp_path, kept as it is by every case."""
        target = self.tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
            for p in target.rglob("*"):
                if p.is_file():
                    self.user[p] = p.read_bytes()
        else:
            shutil.copy(source, target)
            self.user[target] = target.read_bytes()
        return target

    def home(self) -> Path:
        home = self.tmp / "home"
        home.mkdir(exist_ok=True)
        self.mp.setenv("HOME", str(home))
        return home

    def train(self, *overrides: str, extra: tuple = (), config: Path | None = None) -> list:
        return ["--config", config or self.config, *[x for o in overrides for x in (SET, o)], *extra]

    def eval(self, *extra: str, data: Path | None = None) -> list:
        """`tropd-ds eval` of the workspace student: 2 prompts, 2 new tokens, on the CPU, unless `extra` says
        otherwise."""
        defaults = {"--max-prompts": "2", "--max-new-tokens": "2", "--device": "cpu"}
        kept = [x for flag, value in defaults.items() if flag not in extra for x in (flag, value)]
        return ["eval", self.ws / "student", "--data", data or self.ws / "data/eval.jsonl", *kept, *extra]

    def fake_checkpoint(self, step: int = 3) -> Path:
        root = self.tmp / "ckpt_with_step"
        (root / f"step{step}").mkdir(parents=True)
        (root / f"step{step}" / "manifest.json").write_text(json.dumps({"step": step, "world_size": 1, "files": {}}))
        (root / "latest").write_text(f"step{step}")
        return root


@dataclass(frozen=True)
class Case:
    area: str  # paths | config | cli | data | numbers | files
    run: str  # "train": command.prepare(argv); "cli": cli.main(argv)
    argv: Callable[[Ctx], list]
    code: int  # 0: success (prepare returns the checked config)
    words: tuple = ()  # in the message: stderr, or stdout + stderr on success
    absent: tuple = ()  # not in the message
    then: Callable | None = None  # then(ctx, result): more checks
    xfail: str | None = None  # what happens now, for a case that fails the rule
    before: Callable | None = None  # before(ctx): a first call the case depends on (run by the case)
    skip: Callable | None = None  # skip(): a reason to skip here, or None


def T(area, argv, code, *words, **kw) -> Case:  # noqa: N802
    return Case(area, "train", argv, code, tuple(words), **kw)


def C(area, argv, code, *words, **kw) -> Case:  # noqa: N802
    return Case(area, "cli", argv, code, tuple(words), **kw)


# ----------------------------------------------------------------------------- case builders


def _model_config(ctx: Ctx, name: str, **changes) -> Path:
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    base.update(changes)
    return ctx.file(name, json.dumps(base))


PLAN = ["plan", "--student", "qwen2.5-7b", "--teacher", "llama-3.1-70b"]


def _plan_model(ctx: Ctx, path: Path) -> list:
    return ["plan", "--student", path, "--teacher", "llama-3.1-70b"]


def _ds(ctx: Ctx, name: str, data: dict) -> Path:
    return ctx.file(name, json.dumps(data))


def _flat(cfg: dict) -> list[str]:
    return [f"{s}.{k}={json.dumps(v)}" for s, values in cfg.items() for k, v in values.items()]


def _loop(ctx: Ctx) -> Path:
    loop = ctx.tmp / "loop"
    loop.symlink_to(loop)
    return loop


def _config_text(ctx: Ctx, name: str, text: str | bytes) -> Path:
    return ctx.file(name, text)


def _good_yaml(ctx: Ctx) -> str:
    return yaml.safe_dump(ctx.cfg)


def _symlinked_config(ctx: Ctx) -> list:
    real = ctx.tmp / "real"
    real.mkdir()
    ctx.copy(ctx.ws / "data/train.jsonl", "real/tr.jsonl")
    cfg = json.loads(json.dumps(ctx.cfg))
    cfg["data"]["path"] = "tr.jsonl"
    (real / "run.yaml").write_text(yaml.safe_dump(cfg))
    (ctx.tmp / "other").mkdir()
    (ctx.tmp / "other/run.yaml").symlink_to(real / "run.yaml")
    return ["--config", ctx.tmp / "other/run.yaml"]


def _relative_config(ctx: Ctx) -> list:
    (ctx.tmp / "cfgdir").mkdir()
    ctx.copy(ctx.ws / "data/train.jsonl", "cfgdir/tr.jsonl")
    cfg = json.loads(json.dumps(ctx.cfg))
    cfg["data"]["path"] = "tr.jsonl"
    cfg["checkpoint"].update(dir="out/ckpt", export_dir="out/export")
    cfg["logging"]["dir"] = "out/logs"
    ctx.write_config("cfgdir/run.yaml", cfg)
    (ctx.tmp / "run_from_here").mkdir()
    ctx.mp.chdir(ctx.tmp / "run_from_here")
    return ["--config", ctx.tmp / "cfgdir/run.yaml"]


def _relative_config_arg(ctx: Ctx) -> list:
    ctx.mp.chdir(ctx.tmp)
    return ["--config", "run.yaml"]


def _relative_set_path(ctx: Ctx) -> list:
    (ctx.tmp / "elsewhere").mkdir()
    ctx.copy(ctx.ws / "data/train.jsonl", "beside.jsonl")
    ctx.mp.chdir(ctx.tmp / "elsewhere")
    return ctx.train("data.path=beside.jsonl")


def _unicode_paths(ctx: Ctx) -> list:
    data = ctx.copy(ctx.ws / "data/train.jsonl", "with space é 数据/train set.jsonl")
    return ctx.train(f"data.path={data}", f"checkpoint.dir={ctx.tmp / 'ckpt dir ü'}")


def _equals_in_value(ctx: Ctx) -> list:
    data = ctx.copy(ctx.ws / "data/train.jsonl", "a=b.jsonl")
    return ctx.train(f"data.path={data}")


def _student_link(ctx: Ctx) -> list:
    (ctx.tmp / "student_link").symlink_to(ctx.ws / "student")
    return ctx.train(f"student.path={ctx.tmp / 'student_link'}")


def _eval_rows(rows: list) -> Callable:
    return lambda c: c.train(f"data.eval_path={c.rows(rows)}")


def _eval_text(text: str) -> Callable:
    return lambda c: c.train(f"data.eval_path={c.file('held_out.jsonl', text)}")


def _train_rows(rows: list) -> Callable:
    return lambda c: c.train(f"data.path={c.rows(rows)}")


def _train_text(name: str, text: str) -> Callable:
    return lambda c: c.train(f"data.path={c.file(name, text)}")


def _folder(ctx: Ctx, name: str) -> Path:
    (ctx.tmp / name).mkdir()
    return ctx.tmp / name


def _afile(ctx: Ctx) -> Path:
    return ctx.file("afile", "x")


def _tilde_ckpt(ctx: Ctx) -> list:
    ctx.home()
    return ctx.train("checkpoint.dir=~/ckpt")


def _tilde_data(ctx: Ctx) -> list:
    home = ctx.home()
    shutil.copy(ctx.ws / "data/train.jsonl", home / "train.jsonl")
    return ctx.train("data.path=~/train.jsonl")


def _dangling_logs(ctx: Ctx) -> list:
    (ctx.tmp / "dangling").symlink_to(ctx.tmp / "unmounted/logs")
    return ctx.train(f"logging.dir={ctx.tmp / 'dangling'}")


def _anchor_alias(ctx: Ctx) -> list:
    text = (
        _good_yaml(ctx)
        .replace("micro_batch_size: 2", "micro_batch_size: &mb 2")
        .replace("micro_batch_size: 4", "micro_batch_size: *mb")
    )
    return ["--config", _config_text(ctx, "alias.yaml", text)]


def _merge_key(ctx: Ctx) -> list:
    """A merge key (<<) in a section: the merged keys fill in, the section's own keys win."""
    merged = "student:\n  <<: {gradient_checkpointing: true, micro_batch_size: 1}\n"
    text = _good_yaml(ctx).replace("student:\n", merged, 1)
    return ["--config", _config_text(ctx, "merge.yaml", text)]


def _every_setting_by_set(ctx: Ctx) -> list:
    empty = _config_text(ctx, "empty.yaml", "")
    return ["--config", empty, *[x for o in _flat(ctx.cfg) for x in (SET, o)]]


def _config_then(ctx: Ctx, what: str) -> None:
    """A first prepare of the good config, then `what` happens to the config or data file."""
    result = command.prepare(["--config", str(ctx.config)])
    assert not isinstance(result, int), result
    ownership.release_lock(result[0].checkpoint.dir)
    if what == "deleted":
        ctx.config.unlink()
    elif what == "folder":
        ctx.config.unlink()
        ctx.config.mkdir()


def _data_deleted_between_calls(ctx: Ctx) -> list:
    data = ctx.tmp / "train.jsonl"
    shutil.copy(ctx.ws / "data/train.jsonl", data)
    argv = ctx.train(f"data.path={data}")
    result = command.prepare([str(a) for a in argv])
    assert not isinstance(result, int), result
    ownership.release_lock(result[0].checkpoint.dir)
    data.unlink()
    return argv


def _fifo_config(ctx: Ctx) -> list:
    fifo = ctx.tmp / "fifo.yaml"
    os.mkfifo(fifo)
    return ["--config", fifo]


def _empty_lock(ctx: Ctx) -> list:
    ckpt = ctx.tmp / "ckpt"
    ckpt.mkdir()
    ctx.file("ckpt/run.lock", "")  # a run that died between creating its lock and writing it
    return ctx.train(f"checkpoint.dir={ckpt}")


def _folder_named(ctx: Ctx, where: str, name: str) -> list:
    folder = ctx.tmp / where
    (folder / name).mkdir(parents=True)
    key = "checkpoint.dir" if where == "ckpt" else "logging.dir"
    return ctx.train(f"{key}={folder}")


def _users_metrics(ctx: Ctx) -> list:
    ctx.file("mylogs/metrics.jsonl", '{"epoch": 1, "loss": 0.5}\n')  # the user's own records, not a run's
    return ctx.train(f"logging.dir={ctx.tmp / 'mylogs'}")


def _same_via_link(ctx: Ctx) -> list:
    (ctx.tmp / "real_out").mkdir()
    (ctx.tmp / "out_link").symlink_to(ctx.tmp / "real_out")
    return ctx.train(f"checkpoint.export_dir={ctx.tmp / 'real_out'}", f"logging.dir={ctx.tmp / 'out_link'}")


def _export_into_student_via_link(ctx: Ctx) -> list:
    (ctx.tmp / "student_link").symlink_to(ctx.ws / "student")
    return ctx.train(f"checkpoint.export_dir={ctx.tmp / 'student_link' / 'out'}")


def _ckpt_link_to_teacher(ctx: Ctx) -> list:
    (ctx.tmp / "teacher_link").symlink_to(ctx.ws / "teacher")
    return ctx.train(f"checkpoint.dir={ctx.tmp / 'teacher_link'}")


def _lora_huge_skip() -> str | None:
    try:
        mode = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
    except OSError:
        return "no /proc/sys/vm/overcommit_memory here"
    return None if mode in ("0", "2") else f"vm.overcommit_memory={mode}: a 12.8 TB allocation might not fail at once"


# ----------------------------------------------------------------------------- checks of successful cases


def _resolved(**expected) -> Callable:
    """then(): the checked config has these values ('section.field' with '__' for '.')."""

    def check(ctx: Ctx, res) -> None:
        for key, value in expected.items():
            section, name = key.split("__")
            value = value(ctx) if callable(value) else value
            assert getattr(getattr(res.cfg, section), name) == value, (key, getattr(getattr(res.cfg, section), name))

    return check


def _answers(*expected) -> Callable:
    def check(ctx: Ctx, res) -> None:
        assert [str(a) for a in res.prepared.eval_rows["answer"]] == list(expected)

    return check


def _no_literal_tilde(ctx: Ctx, res) -> None:
    home = ctx.tmp / "home"
    assert res.cfg.checkpoint.dir == str(home / "ckpt"), res.cfg.checkpoint.dir
    assert not (ctx.tmp / "~").exists(), "a folder literally named '~' was made beside the config"


def _eval_json(**expected) -> Callable:
    def check(ctx: Ctx, res) -> None:
        result = json.loads(res.out.strip().splitlines()[-1])
        for key, value in expected.items():
            assert result[key] == value, (key, result[key])

    return check


def _dump_json(**expected) -> Callable:
    def check(ctx: Ctx, res) -> None:
        dumped = json.loads(res.out)
        for key, value in expected.items():
            section, name = key.split("__")
            value = value(ctx) if callable(value) else value
            assert dumped[section][name] == value, (key, dumped[section][name])

    return check


def _exists(name: str) -> Callable:
    def check(ctx: Ctx, res) -> None:
        assert (ctx.tmp / name).is_file()

    return check


def _check(predicate: Callable) -> Callable:
    def check(ctx: Ctx, res) -> None:
        assert predicate(ctx, res), res.out[-2000:]

    return check


def _absent_path(name: str) -> Callable:
    def check(ctx: Ctx, res) -> None:
        assert not (ctx.tmp / name).exists()

    return check


# ----------------------------------------------------------------------------- the cases


def _bad_env(name: str, value: str) -> Case:
    """`tropd-ds train` under a launcher variable that is not a valid rank count or index: refused, named."""
    return T("cli", lambda c: (c.mp.setenv(name, value), c.train())[1], 2, name, value)


CASES: dict[str, Case] = {
    # ------------------------------------------------------------------ paths and home directories
    "~ in checkpoint.dir is the home folder": T(
        "paths",
        _tilde_ckpt,
        0,
        then=_no_literal_tilde,
    ),
    "~ in data.path is the home folder": T(
        "paths",
        _tilde_data,
        0,
        then=_resolved(data__path=lambda c: str(c.tmp / "home/train.jsonl")),
    ),
    "relative paths resolve beside the config, not the working folder": T(
        "paths",
        _relative_config,
        0,
        then=_resolved(
            data__path=lambda c: str(c.tmp / "cfgdir/tr.jsonl"),
            checkpoint__dir=lambda c: str(c.tmp / "cfgdir/out/ckpt"),
        ),
    ),
    "relative --config resolves against the working folder": T("paths", _relative_config_arg, 0),
    "relative --set path resolves beside the config": T(
        "paths", _relative_set_path, 0, then=_resolved(data__path=lambda c: str(c.tmp / "beside.jsonl"))
    ),
    "spaces and unicode in data and checkpoint paths": T(
        "paths", _unicode_paths, 0, then=_resolved(checkpoint__dir=lambda c: str(c.tmp / "ckpt dir ü"))
    ),
    "config symlinked from another folder resolves beside its target": T(
        "paths", _symlinked_config, 0, then=_resolved(data__path=lambda c: str(c.tmp / "real/tr.jsonl"))
    ),
    "student.path through a symlink": T("paths", _student_link, 0),
    "= inside a --set value is part of the value": T(
        "paths", _equals_in_value, 0, then=_resolved(data__path=lambda c: str(c.tmp / "a=b.jsonl"))
    ),
    "data.path through a file": T(
        "paths",
        lambda c: c.train(f"data.path={_afile(c)}/train.jsonl"),
        2,
        "data.path=",
        "/afile/train.jsonl",
        "does not exist: expected a data file",
    ),
    "student.path through a file": T(
        "paths",
        lambda c: c.train(f"student.path={_afile(c)}/student"),
        2,
        "student.path=",
        "/afile/student",
        "expected a Hugging Face model folder with config.json",
    ),
    "checkpoint.dir through a file": T(
        "paths",
        lambda c: c.train(f"checkpoint.dir={_afile(c)}/ckpt"),
        2,
        "checkpoint.dir=",
        "afile is a file",
        "expected a folder",
    ),
    "data.path a symlink loop": T(
        "paths", lambda c: c.train(f"data.path={_loop(c)}"), 2, "data.path=", "/loop' does not exist"
    ),
    "checkpoint.dir a symlink loop": T(
        "paths",
        lambda c: c.train(f"checkpoint.dir={_loop(c)}"),
        2,
        "checkpoint.dir=",
        "/loop",
    ),
    "logging.dir a dangling symlink": T(
        "paths",
        _dangling_logs,
        2,
        "logging.dir=",
        "dangling",
        "is a link to",
    ),
    "checkpoint.dir name longer than 255 bytes": T(
        "paths",
        lambda c: c.train(f"checkpoint.dir={c.tmp / LONG}"),
        2,
        "checkpoint.dir=",
        "too long",
    ),
    "data.path name longer than 255 bytes": T(
        "paths",
        lambda c: c.train(f"data.path={c.tmp / LONG}.jsonl"),
        2,
        "data.path=",
        "too long",
    ),
    "student.path name longer than 255 bytes": T(
        "paths",
        lambda c: c.train(f"student.path={c.tmp / LONG}"),
        2,
        "student.path=",
        "too long",
    ),
    "--config name longer than 255 bytes": T(
        "paths",
        lambda c: ["--config", c.tmp / f"{LONG}.yaml"],
        2,
        "config file",
        "too long",
    ),
    "checkpoint.dir a symlink to the teacher folder": T(
        "paths",
        _ckpt_link_to_teacher,
        2,
        "checkpoint.dir=",
        "is the teacher's model folder",
        "expected a folder outside it",
    ),
    # ------------------------------------------------------------------ config files and their syntax
    "YAML anchor and alias between sections": T(
        "config", _anchor_alias, 0, then=_resolved(teacher__micro_batch_size=2)
    ),
    "YAML merge key in a section": T(
        "config", _merge_key, 0, then=_resolved(student__micro_batch_size=2, student__gradient_checkpointing=True)
    ),
    "x- style anchor holder at the top level": T(
        "config",
        lambda c: ["--config", _config_text(c, "xa.yaml", "x-defaults: &d {dtype: float32}\n" + _good_yaml(c))],
        2,
        "unknown config key 'x-defaults'",
        "valid keys",
    ),
    "duplicate top-level section in YAML": T(
        "config",
        lambda c: ["--config", _config_text(c, "dup.yaml", _good_yaml(c) + "optim:\n  steps: 2\n")],
        2,
        "optim",
        "duplicate",
    ),
    "duplicate key inside a YAML section": T(
        "config",
        lambda c: [
            "--config",
            _config_text(c, "dup2.yaml", _good_yaml(c).replace("  lr: 0.001\n", "  lr: 0.001\n  lr: 0.5\n")),
        ],
        2,
        "lr",
        "duplicate",
    ),
    "duplicate key in a JSON config": T(
        "config",
        lambda c: ["--config", _config_text(c, "dup.json", json.dumps(c.cfg)[:-1] + ', "seed": 3, "seed": 4}')],
        2,
        "seed",
        "duplicate",
    ),
    "top-level list with a --set": T(
        "config",
        lambda c: ["--config", _config_text(c, "list.yaml", "- a\n- b\n"), SET, "seed=1"],
        2,
        "config is a list",
        "expected a mapping",
    ),
    "top-level scalar 0": T(
        "config",
        lambda c: ["--config", _config_text(c, "zero.yaml", "0\n")],
        2,
        "config is an int",
        "expected a mapping",
    ),
    "top-level string": T(
        "config",
        lambda c: ["--config", _config_text(c, "str.yaml", "hello\n")],
        2,
        "config is a str",
        "expected a mapping of keys",
    ),
    "a section that is a list": T(
        "config",
        lambda c: ["--config", _config_text(c, "ls.yaml", yaml.safe_dump({**c.cfg, "optim": [{"lr": 1e-3}]}))],
        2,
        "optim is a list: expected a mapping of keys",
    ),
    "objective.options a list": T(
        "config", lambda c: c.train("objective.options=[8]"), 2, "objective.options=[8]: expected dict"
    ),
    "tab indentation": T(
        "config",
        lambda c: ["--config", _config_text(c, "tab.yaml", _good_yaml(c).replace("  lr:", "\tlr:"))],
        2,
        "tab.yaml:",
        "YAML syntax error",
        "'\\t'",
    ),
    "UTF-8 byte-order mark in YAML": T(
        "config", lambda c: ["--config", _config_text(c, "bom.yaml", b"\xef\xbb\xbf" + _good_yaml(c).encode())], 0
    ),
    "UTF-8 byte-order mark in JSON": T(
        "config",
        lambda c: ["--config", _config_text(c, "bom.json", b"\xef\xbb\xbf" + json.dumps(c.cfg).encode())],
        2,
        "bom.json:1:1: JSON syntax error",
        "BOM",
    ),
    "UTF-16 config": T(
        "config",
        lambda c: ["--config", _config_text(c, "u16.yaml", _good_yaml(c).encode("utf-16"))],
        2,
        "config file",
        "u16.yaml",
        "cannot be read",
    ),
    "JSON with a // comment": T(
        "config",
        lambda c: ["--config", _config_text(c, "c.json", "// my run\n" + json.dumps(c.cfg))],
        2,
        "c.json:1:1: JSON syntax error",
    ),
    "JSON text in a .yml file": T(
        "config",
        lambda c: ["--config", _config_text(c, "j.yml", json.dumps(c.cfg))],
        0,
        then=_resolved(optim__lr=1e-3),
    ),
    "YAML text in a .json file": T(
        "config", lambda c: ["--config", _config_text(c, "y.json", _good_yaml(c))], 2, "y.json:1:1: JSON syntax error"
    ),
    "two YAML documents": T(
        "config",
        lambda c: ["--config", _config_text(c, "multi.yaml", _good_yaml(c) + "---\nseed: 1\n")],
        2,
        "multi.yaml:",
        "expected a single document",
    ),
    "python object tag": T(
        "config",
        lambda c: [
            "--config",
            _config_text(c, "tag.yaml", _good_yaml(c) + "seed: !!python/object/apply:os.system ['true']\n"),
        ],
        2,
        "tag.yaml:",
        "could not determine a constructor",
    ),
    "unknown section": T(
        "config",
        lambda c: ["--config", _config_text(c, "us.yaml", _good_yaml(c) + "trainer:\n  x: 1\n")],
        2,
        "unknown config key 'trainer'; did you mean 'teacher'?",
    ),
    "nested unknown key": T(
        "config",
        lambda c: c.train("rollout.temprature=1.0"),
        2,
        "unknown config key 'rollout.temprature'; did you mean 'temperature'?",
    ),
    "a section left empty (null)": T(
        "config",
        lambda c: [
            "--config",
            _config_text(c, "ns.yaml", yaml.safe_dump({k: v for k, v in c.cfg.items() if k != "eval"}) + "eval:\n"),
        ],
        2,
        "eval is a NoneType: expected a mapping of keys",
    ),
    "a key that is a number": T(
        "config",
        lambda c: ["--config", _config_text(c, "ki.yaml", _good_yaml(c) + "1: 2\n")],
        2,
        "unknown config key",
        "1",
    ),
    "empty file with every setting by --set": T("config", _every_setting_by_set, 0, then=_resolved(optim__steps=6)),
    "--set with an empty key": T("config", lambda c: c.train("=5"), 2, "unknown config key ''", "valid keys"),
    "--set with a double dot": T("config", lambda c: c.train("optim..lr=1"), 2, "unknown config key 'optim.'"),
    "--set with an unclosed list": T(
        "config", lambda c: c.train("optim.betas=[0.9, 0.99"), 2, "optim.betas='[0.9, 0.99': expected tuple"
    ),
    "--set with spaces around key and value": T(
        "config", lambda c: c.train(" optim.lr = 0.002 "), 0, then=_resolved(optim__lr=0.002)
    ),
    "--set of a section as a flow mapping merges": T(
        "config",
        lambda c: c.train("optim={lr: 0.002}"),
        0,
        then=_resolved(optim__lr=0.002, optim__steps=6),
    ),
    "--set of a section to null": T(
        "config", lambda c: c.train("optim=null"), 2, "optim is a NoneType: expected a mapping of keys"
    ),
    "--set of a bool to yes": T(
        "config", lambda c: c.train("rollout.guidance=yes"), 0, then=_resolved(rollout__guidance=True)
    ),
    # ------------------------------------------------------------------ train (command.prepare) arguments
    "train --config without a value": T("cli", lambda c: ["--config"], 2, "argument --config: expected one argument"),
    "train --set without a value": T(
        "cli", lambda c: ["--config", c.config, SET], 2, "argument --set: expected one argument"
    ),
    "train unknown flag": T(
        "cli", lambda c: ["--config", c.config, "--verbose"], 2, "unrecognized arguments: --verbose"
    ),
    "train --world-size not a number": T(
        "cli",
        lambda c: c.train(extra=("--dry-run", "--world-size", "abc")),
        2,
        "argument --world-size: invalid int value: 'abc'",
    ),
    "train --world-size that does not divide the prompts": T(
        "cli",
        lambda c: c.train(extra=("--dry-run", "--world-size", "3")),
        2,
        "rollout.prompts_per_step=4: expected a multiple of the 3 ranks",
    ),
    "train --world-size without --dry-run": T(
        "cli",
        lambda c: c.train(extra=("--world-size", "4")),
        2,
        "--world-size",
        "--dry-run",
    ),
    "train --dry-run --gpu-mem nan": T(
        "cli",
        lambda c: c.train(extra=("--dry-run", "--gpu-mem", "nan")),
        2,
        "--gpu-mem=nan",
    ),
    "train --dry-run --gpu-mem 0": T(
        "cli",
        lambda c: c.train(extra=("--dry-run", "--gpu-mem", "0")),
        2,
        "--gpu-mem=0",
    ),
    "train --config given twice: the last one counts": T(
        "cli",
        lambda c: ["--config", c.config, "--config", c.tmp / "missing.yaml"],
        2,
        "config file",
        "missing.yaml' does not exist",
    ),
    "tropd-ds train --dry-run": C(
        "cli", lambda c: ["train", *c.train(extra=("--dry-run",))], 0, "dry run finished in", "no engine started"
    ),
    "WORLD_SIZE not a number": _bad_env("WORLD_SIZE", "two"),
    "WORLD_SIZE 0": _bad_env("WORLD_SIZE", "0"),
    "WORLD_SIZE negative": _bad_env("WORLD_SIZE", "-2"),
    "RANK not a number": _bad_env("RANK", "x"),
    "LOCAL_RANK not a number": _bad_env("LOCAL_RANK", "x"),
    # ------------------------------------------------------------------ plan
    "plan --gradient-checkpointing maybe": C(
        "cli",
        lambda c: [*PLAN, "--gradient-checkpointing", "maybe"],
        2,
        "--gradient-checkpointing",
        "maybe",
    ),
    "plan --set without --config": C(
        "cli",
        lambda c: [*PLAN, SET, "rollout.max_new_tokens=5"],
        2,
        "--set",
        "--config",
    ),
    "plan --student config.json that is not JSON": C(
        "cli",
        lambda c: _plan_model(c, c.file("bad/config.json", '{"hidden_size": 64,')),
        2,
        "bad/config.json",
    ),
    "plan --student config.json holding a list": C(
        "cli",
        lambda c: _plan_model(c, c.file("list/config.json", "[1, 2]")),
        2,
        "list/config.json",
    ),
    "plan --student with 0 attention heads": C(
        "cli",
        lambda c: _plan_model(c, _model_config(c, "heads0.json", num_attention_heads=0)),
        2,
        "num_attention_heads",
    ),
    "plan --student with hidden_size a string": C(
        "cli",
        lambda c: _plan_model(c, _model_config(c, "hstr.json", hidden_size="64")),
        2,
        "hidden_size",
    ),
    "plan --student with a negative hidden_size": C(
        "cli",
        lambda c: _plan_model(c, _model_config(c, "hneg.json", hidden_size=-64)),
        2,
        "hidden_size",
    ),
    "plan --config whose student.ds_config is missing": C(
        "cli",
        lambda c: ["plan", "--config", c.config, SET, f"student.ds_config={c.tmp / 'nope.json'}"],
        2,
        "nope.json",
    ),
    "plan --config with an empty teacher.ds_config": C(
        "cli",
        lambda c: ["plan", "--config", c.config, SET, "teacher.ds_config="],
        2,
        "teacher.ds_config",
    ),
    "plan --config with zero_optimization: null": C(
        "cli",
        lambda c: [
            "plan",
            "--config",
            c.config,
            SET,
            f"teacher.ds_config={_ds(c, 'zn.json', {'zero_optimization': None})}",
        ],
        2,
        "zero_optimization",
    ),
    "plan --config with offload_param a string": C(
        "cli",
        lambda c: [
            "plan",
            "--config",
            c.config,
            SET,
            f"teacher.ds_config={_ds(c, 'os.json', {'zero_optimization': {'offload_param': 'cpu'}})}",
        ],
        2,
        "offload_param",
    ),
    "plan --k 8.5": C("cli", lambda c: [*PLAN, "--k", "8.5"], 2, "argument --k: invalid int value: '8.5'"),
    "plan --student-offload disk": C(
        "cli", lambda c: [*PLAN, "--student-offload", "disk"], 2, "invalid choice: 'disk'", "'optimizer+params'"
    ),
    "plan --gpus-per-node 0": C(
        "cli", lambda c: [*PLAN, "--gpus-per-node", "0"], 2, "--gpus-per-node=0: expected a finite number > 0"
    ),
    "plan --student an empty folder": C(
        "cli", lambda c: _plan_model(c, _folder(c, "emptydir")), 2, "emptydir'", "expected one of llama-3.1-8b"
    ),
    "plan without --teacher": C(
        "cli", lambda c: ["plan", "--student", "qwen2.5-7b"], 2, "give --student and --teacher"
    ),
    "plan --config of the tiny models": C("cli", lambda c: ["plan", "--config", c.config], 0, "verdict: fits"),
    "plan --config with a bad --set": C(
        "cli", lambda c: ["plan", "--config", c.config, SET, "optim.lr=x"], 2, "optim.lr='x': expected float"
    ),
    # ------------------------------------------------------------------ eval
    "eval --out in a folder that does not exist": C(
        "cli",
        lambda c: c.eval("--out", str(c.tmp / "nodir/result.jsonl")),
        2,
        "--out",
        "nodir",
    ),
    "eval --out through a file": C(
        "cli",
        lambda c: c.eval("--out", f"{_afile(c)}/result.jsonl"),
        2,
        "--out",
        "afile",
    ),
    "eval --out and --records the same file": C(
        "cli",
        lambda c: c.eval("--out", str(c.tmp / "same.jsonl"), "--records", str(c.tmp / "same.jsonl")),
        2,
        "--out",
        "--records",
    ),
    "eval --records is the --data file": C(
        "cli",
        lambda c: c.eval("--records", str(c.copy(c.ws / "data/eval.jsonl", "ev.jsonl")), data=c.tmp / "ev.jsonl"),
        2,
        "--records",
        "--data",
    ),
    "eval --out is the --data file": C(
        "cli",
        lambda c: c.eval("--out", str(c.copy(c.ws / "data/eval.jsonl", "ev.jsonl")), data=c.tmp / "ev.jsonl"),
        2,
        "--out",
        "--data",
    ),
    "eval --max-new-tokens past the model's positions": C(
        "cli",
        lambda c: c.eval("--max-prompts", "1", "--max-new-tokens", "300"),
        2,
        "--max-new-tokens",
        "max_position_embeddings",
    ),
    "eval --prompt-column the data lacks": C(
        "cli",
        lambda c: c.eval("--prompt-column", "question"),
        2,
        "'question' (--prompt-column)",
    ),
    "eval --temperature inf": C(
        "cli", lambda c: c.eval("--temperature", "inf"), 2, "--temperature=inf: expected a finite number >= 0"
    ),
    "eval --device cuda:x": C(
        "cli", lambda c: c.eval("--device", "cuda:x"), 2, "--device='cuda:x': expected auto, cpu, cuda or cuda:N"
    ),
    "eval --device tpu": C("cli", lambda c: c.eval("--device", "tpu"), 2, "--device='tpu'"),
    "eval --answer-pattern not a regex": C(
        "cli", lambda c: c.eval("--answer-pattern", "(("), 2, "--answer-pattern='((' is not a regular expression"
    ),
    "eval --chat-template-kwargs not JSON": C(
        "cli",
        lambda c: c.eval("--chat-template-kwargs", "{enable_thinking: false}"),
        2,
        "--chat-template-kwargs='{enable_thinking: false}': expected a JSON object",
    ),
    "eval --chat-template-kwargs a keyword tropd-ds sets": C(
        "cli",
        lambda c: c.eval("--chat-template-kwargs", '{"tokenize": true}'),
        2,
        "--chat-template-kwargs sets 'tokenize'",
    ),
    "eval --split of a file": C("cli", lambda c: c.eval("--split", "test"), 2, "--split='test' with the file"),
    "eval --answer-column the data lacks": C(
        "cli",
        lambda c: c.eval("--answer-column", "solution"),
        2,
        "an answer column 'solution' (--answer-column) is required",
    ),
    "eval --data a folder of two splits": C(
        "cli", lambda c: c.eval(data=c.ws / "data"), 2, "has splits ['train', 'test']", "set --split"
    ),
    "eval --dtype int8": C("cli", lambda c: c.eval("--dtype", "int8"), 2, "argument --dtype: invalid choice: 'int8'"),
    "eval --samples 3 with greedy decoding": C(
        "cli", lambda c: c.eval("--samples", "3"), 2, "--samples=3 with --temperature=0"
    ),
    "eval without --data": C(
        "cli", lambda c: ["eval", c.ws / "student"], 2, "the following arguments are required: --data"
    ),
    "eval --max-prompts beyond the data": C(
        "cli", lambda c: c.eval("--max-prompts", "100000000000000000000"), 0, then=_eval_json(eval_prompts=16)
    ),
    "eval --records in a folder that does not exist yet": C(
        "cli", lambda c: c.eval("--records", str(c.tmp / "new/records.jsonl")), 0, then=_exists("new/records.jsonl")
    ),
    # ------------------------------------------------------------------ export
    "export --out only spaces": C(
        "cli", lambda c: ["export", "--config", c.config, "--out", "   "], 2, "--out is empty: expected a folder"
    ),
    "export --tag empty": C(
        "cli",
        lambda c: [
            "export",
            "--config",
            c.config,
            SET,
            f"checkpoint.dir={c.fake_checkpoint()}",
            "--out",
            c.tmp / "exp",
            "--tag",
            "",
        ],
        2,
        "--tag",
        "empty",
    ),
    "export --tag ..": C(
        "cli",
        lambda c: [
            "export",
            "--config",
            c.config,
            SET,
            f"checkpoint.dir={c.fake_checkpoint()}",
            "--out",
            c.tmp / "exp",
            "--tag",
            "..",
        ],
        2,
        "checkpoint .. in",
        "--tag",
        then=_absent_path("exp"),
    ),
    "export --tag that is not there": C(
        "cli",
        lambda c: [
            "export",
            "--config",
            c.config,
            SET,
            f"checkpoint.dir={c.fake_checkpoint()}",
            "--out",
            c.tmp / "exp",
            "--tag",
            "step9",
        ],
        2,
        "checkpoint tag 'step9' is not in",
        "available ['step3']",
    ),
    "export --out inside the teacher": C(
        "cli",
        lambda c: ["export", "--config", c.config, "--out", c.ws / "teacher/sub"],
        2,
        "is inside the teacher's model folder",
    ),
    "export --out a folder of user data": C(
        "cli",
        lambda c: [
            "export",
            "--config",
            c.config,
            SET,
            f"checkpoint.dir={c.fake_checkpoint()}",
            "--out",
            c.copy(c.ws / "data", "userdata"),
        ],
        2,
        "is not empty (eval.jsonl, train.jsonl)",
        "--force",
    ),
    "export --out name longer than 255 bytes": C(
        "cli",
        lambda c: ["export", "--config", c.config, "--out", c.tmp / LONG],
        2,
        "--out",
        "too long",
        absent=("free space",),
    ),
    "export --dtype int4": C(
        "cli",
        lambda c: ["export", "--config", c.config, "--out", c.tmp / "e", "--dtype", "int4"],
        2,
        "argument --dtype: invalid choice: 'int4'",
    ),
    "export from a run without checkpoints": C(
        "cli",
        lambda c: ["export", "--config", c.config, "--out", c.tmp / "exp"],
        2,
        "has no complete checkpoint",
        then=_absent_path("exp"),
    ),
    "export --out a symlink loop": C(
        "cli",
        lambda c: ["export", "--config", c.config, "--out", _loop(c)],
        2,
        "--out=",
        "is a link to",
        "which does not exist",
    ),
    # ------------------------------------------------------------------ config and the command itself
    "config --list with a --config that does not exist": C(
        "cli",
        lambda c: ["config", "--list", "--config", c.tmp / "nope.yaml"],
        2,
        "--config",
        "--list",
    ),
    "config --list --dump": C(
        "cli", lambda c: ["config", "--list", "--dump"], 2, "argument --dump: not allowed with argument --list"
    ),
    "config without --list, --dump or --presets": C(
        "cli", lambda c: ["config"], 2, "one of the arguments --list --dump --presets is required"
    ),
    "config --dump with a section set to a number": C(
        "cli",
        lambda c: ["config", "--dump", "--config", c.config, SET, "optim=1"],
        2,
        "optim is an int: expected a mapping of keys",
    ),
    "config --dump --json with a --set": C(
        "cli",
        lambda c: ["config", "--dump", "--json", "--config", c.config, SET, "seed=7"],
        0,
        then=_check(lambda c, r: json.loads(r.out)["seed"] == 7),
    ),
    "config --dump with ~ in logging.dir": C(
        "cli",
        lambda c: (c.home(), ["config", "--dump", "--json", "--config", c.config, SET, "logging.dir=~/logs"])[1],
        0,
        then=_dump_json(logging__dir=lambda c: str(c.tmp / "home/logs")),
    ),
    "an unknown command": C(
        "cli",
        lambda c: ["trian"],
        2,
        "'trian'",
        "train, serve-teacher, plan, eval, export, config",
    ),
    "--help": C("cli", lambda c: ["--help"], 0, "train   the distillation run"),
    # ------------------------------------------------------------------ answer and label types in data
    "held-out answers that are integers": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": 3}, {"prompt": "2+2=", "answer": 4}]),
        0,
        then=_answers("3", "4"),
    ),
    "held-out answer a boolean": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": True}]),
        2,
        "data.eval_path row 0: answer=True (bool): expected a string or a number",
    ),
    "held-out answer a list": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": [3]}]),
        2,
        "data.eval_path row 0: answer=[3] (list)",
    ),
    "held-out answer a nested dict": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": {"v": {"w": 3}}}]),
        2,
        "data.eval_path row 0: answer={'v': {'w': 3}} (dict)",
    ),
    "held-out answer NaN": T(
        "data",
        _eval_text('{"prompt": "1+2=", "answer": NaN}\n'),
        2,
        "data.eval_path row 0",
        "answer=nan",
    ),
    "held-out answer Infinity": T(
        "data",
        _eval_text('{"prompt": "1+2=", "answer": Infinity}\n'),
        2,
        "data.eval_path row 0",
        "answer=inf",
    ),
    "held-out answer whitespace only": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": "  \t "}]),
        2,
        "data.eval_path row 0: answer is",
        "every held-out row needs an answer",
    ),
    "held-out answer of 100,000 characters": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": "9" * 100_000}]),
        0,
        then=_check(lambda c, r: len(r.prepared.eval_rows[0]["answer"]) == 100_000),
    ),
    "held-out answer in Arabic-Indic digits": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": "٣"}]),
        0,
        then=_answers("٣"),
    ),
    "held-out answers integer and float mixed": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": 3}, {"prompt": "1+3=", "answer": 4.5}]),
        0,
        then=_answers("3", "4.5"),
    ),
    "held-out answer a 30-digit integer": T(
        "data",
        _eval_text('{"prompt": "1+2=", "answer": 123456789012345678901234567890}\n'),
        0,
        then=_answers("123456789012345678901234567890"),
    ),
    "held-out answers integer and string mixed": T(
        "data",
        _eval_rows([{"prompt": "1+2=", "answer": 3}, {"prompt": "1+3=", "answer": "four"}]),
        0,
        then=_answers("3", "four"),
    ),
    "training prompt whitespace only": T(
        "data",
        _train_rows([{"prompt": "   ", "teacher_response": "3"}]),
        2,
        "data.path row 0",
        "prompt",
    ),
    "training prompt a boolean": T(
        "data",
        _train_rows([{"prompt": True, "teacher_response": "3"}]),
        2,
        "data.path row 0: prompt=True (bool): expected a non-empty string or a list of chat messages",
    ),
    "training prompt a dict": T(
        "data",
        _train_rows([{"prompt": {"text": "1+2="}, "teacher_response": "3"}]),
        2,
        "data.path row 0: prompt={'text': '1+2='} (dict)",
    ),
    "training prompt of 400,000 characters": T(
        "data",
        _train_rows([{"prompt": "1+" * 200_000 + "1=", "teacher_response": "3"}]),
        0,
    ),
    "training teacher_response a list": T(
        "data",
        _train_rows([{"prompt": "1+2=", "teacher_response": ["3"]}]),
        2,
        "data.path row 0: teacher_response=['3'] (list): expected a string or null",
    ),
    "training answer a boolean": T(
        "data",
        _train_rows([{"prompt": "1+2=", "answer": False, "teacher_response": "3"}]),
        2,
        "data.path row 0: answer=False (bool)",
    ),
    "training JSONL with a line that is not JSON": T(
        "data",
        _train_text("bad.jsonl", '{"prompt": "1+2=", "teacher_response": "3"}\nnot json\n'),
        2,
        "bad.jsonl",
        "line 2",
    ),
    "training CSV whose responses look like numbers": T(
        "data",
        _train_text("d.csv", "prompt,teacher_response\n1+2=,3\n2+2=,4\n"),
        0,
    ),
    "training JSONL of bare arrays": T(
        "data",
        _train_text("arr.jsonl", '["1+2="]\n'),
        2,
        "has columns",
        "expected a prompt column 'prompt'",
    ),
    "training JSON file holding a list of rows": T(
        "data",
        _train_text("rows.json", json.dumps([{"prompt": "1+2=", "teacher_response": "3"}])),
        0,
    ),
    "training JSONL with blank lines": T(
        "data",
        _train_text(
            "blank.jsonl",
            '{"prompt": "1+2=", "teacher_response": "3"}\n\n\n{"prompt": "2+2=", "teacher_response": "4"}\n',
        ),
        0,
        then=_check(lambda c, r: len(r.prepared.train_rows) == 2),
    ),
    "eval --data with a boolean answer": C(
        "cli",
        lambda c: c.eval(data=c.rows([{"prompt": "1+2=", "answer": True}])),
        2,
        "--data row 0: answer=True (bool)",
    ),
    # ------------------------------------------------------------------ numeric extremes
    "student.micro_batch_size 2.5": T(
        "numbers", lambda c: c.train("student.micro_batch_size=2.5"), 2, "student.micro_batch_size=2.5: expected int"
    ),
    "teacher.micro_batch_size true": T(
        "numbers", lambda c: c.train("teacher.micro_batch_size=true"), 2, "teacher.micro_batch_size=True: expected int"
    ),
    "optim.steps '6' quoted": T("numbers", lambda c: c.train("optim.steps='6'"), 2, "optim.steps='6': expected int"),
    "optim.steps 1e3": T("numbers", lambda c: c.train("optim.steps=1e3"), 2, "optim.steps='1e3': expected int"),
    "optim.lr -inf": T("numbers", lambda c: c.train("optim.lr=-.inf"), 2, "optim.lr=-inf: expected a number > 0"),
    "optim.lr 1e400 overflows to inf": T(
        "numbers", lambda c: c.train("optim.lr=1e400"), 2, "optim.lr=inf: expected a number > 0"
    ),
    "optim.lr true": T("numbers", lambda c: c.train("optim.lr=true"), 2, "optim.lr=True: expected float"),
    "optim.min_lr_ratio nan": T(
        "numbers", lambda c: c.train("optim.min_lr_ratio=nan"), 2, "optim.min_lr_ratio=nan: expected a number in [0, 1]"
    ),
    "optim.grad_clip -1": T(
        "numbers", lambda c: c.train("optim.grad_clip=-1"), 2, "optim.grad_clip=-1.0: expected a number >= 0"
    ),
    "optim.weight_decay inf": T(
        "numbers", lambda c: c.train("optim.weight_decay=.inf"), 2, "optim.weight_decay=inf: expected a number >= 0"
    ),
    "optim.max_bad_steps 0": T(
        "numbers", lambda c: c.train("optim.max_bad_steps=0"), 2, "optim.max_bad_steps=0: expected a number >= 1"
    ),
    "rollout.top_p 0": T(
        "numbers", lambda c: c.train("rollout.top_p=0"), 2, "rollout.top_p=0.0: expected a number in (0, 1]"
    ),
    "temperature nan": T(
        "numbers",
        lambda c: c.train("rollout.temperature=nan"),
        2,
        "rollout.temperature=nan: expected a number > 0",
    ),
    "data.max_prompt_tokens 1e20": T(
        "numbers",
        lambda c: c.train("data.max_prompt_tokens=100000000000000000000"),
        2,
        "data.max_prompt_tokens=100000000000000000000 plus max_new_tokens",
        "student's 128 positions",
    ),
    "rollout.max_new_tokens 1e20": T(
        "numbers",
        lambda c: c.train("rollout.max_new_tokens=100000000000000000000"),
        2,
        "rollout 100000000000000000000",
        "student's 128 positions",
    ),
    "rollout.guidance_max_len -1": T(
        "numbers",
        lambda c: c.train("rollout.guidance_max_len=-1"),
        2,
        "rollout.guidance_max_len=-1: expected a number >= 0",
    ),
    "data.shuffle_seed 2**32": T(
        "numbers",
        lambda c: c.train("data.shuffle_seed=4294967296"),
        2,
        "data.shuffle_seed=4294967296: expected an integer in [0, 2**32)",
    ),
    "seed -1": T("numbers", lambda c: c.train("seed=-1"), 2, "seed=-1: expected an integer in [0, 2**32)"),
    "collective_timeout_minutes true": T(
        "numbers",
        lambda c: c.train("collective_timeout_minutes=true"),
        2,
        "collective_timeout_minutes=True: expected float",
    ),
    "collective_timeout_minutes 1e9": T(
        "numbers", lambda c: c.train("collective_timeout_minutes=1e9"), 2, "at most 10080 (a week)"
    ),
    "optim.betas with nan": T(
        "numbers",
        lambda c: c.train("optim.betas=[0.9, .nan]"),
        2,
        "optim.betas=[0.9, nan]: expected two numbers in [0, 1)",
    ),
    "optim.betas as strings": T(
        "numbers",
        lambda c: c.train("optim.betas=['0.9', '0.99']"),
        2,
        "optim.betas=['0.9', '0.99']: expected two numbers",
    ),
    "optim.betas of three": T(
        "numbers",
        lambda c: c.train("optim.betas=[0.9, 0.99, 0.5]"),
        2,
        "optim.betas=[0.9, 0.99, 0.5]: expected two numbers",
    ),
    "objective k 8.5": T(
        "numbers", lambda c: c.train("objective.options={k: 8.5}"), 2, "k=8.5: expected an integer >= 1"
    ),
    "objective k '8'": T(
        "numbers", lambda c: c.train("objective.options={k: '8'}"), 2, "k='8': expected an integer >= 1"
    ),
    "objective k nan": T(
        "numbers", lambda c: c.train("objective.options={k: .nan}"), 2, "k=nan: expected an integer >= 1"
    ),
    "objective k 1e8": T(
        "numbers",
        lambda c: c.train("objective.options={k: 100000000}"),
        2,
        "objective.options.k=100000000 exceeds the vocabulary (18 tokens)",
    ),
    "student.lora r 1e11": T(
        "numbers",
        lambda c: c.train("student.lora={r: 100000000000}"),
        2,
        "student.lora.r=100000000000",
        skip=_lora_huge_skip,
    ),
    "eval.temperature nan": T(
        "numbers", lambda c: c.train("eval.temperature=nan"), 2, "eval.temperature=nan: expected a number >= 0"
    ),
    "logging.samples_every -3": T(
        "numbers", lambda c: c.train("logging.samples_every=-3"), 2, "logging.samples_every=-3: expected a number >= 0"
    ),
    "checkpoint.keep_last -1": T(
        "numbers", lambda c: c.train("checkpoint.keep_last=-1"), 2, "checkpoint.keep_last=-1: expected a number >= 0"
    ),
    # ------------------------------------------------------------------ concurrency and files
    "config deleted between two calls": T(
        "files",
        lambda c: c.train(),
        2,
        "config file",
        "run.yaml' does not exist",
        before=lambda c: _config_then(c, "deleted"),
    ),
    "config replaced by a folder between two calls": T(
        "files",
        lambda c: c.train(),
        2,
        "run.yaml' is a folder: expected a YAML or JSON run config file",
        before=lambda c: _config_then(c, "folder"),
    ),
    "data file deleted between two calls": T(
        "files", _data_deleted_between_calls, 2, "data.path=", "train.jsonl' does not exist"
    ),
    "config a named pipe": T(
        "files",
        _fifo_config,
        2,
        "fifo.yaml",
        absent=("does not exist",),
    ),
    "checkpoint.dir an existing file": T(
        "files",
        lambda c: c.train(f"checkpoint.dir={_afile(c)}"),
        2,
        "checkpoint.dir=",
        "afile is a file, expected a folder",
    ),
    "logging.dir an existing file": T(
        "files", lambda c: c.train(f"logging.dir={_afile(c)}"), 2, "logging.dir=", "afile is a file, expected a folder"
    ),
    "checkpoint.export_dir an existing file": T(
        "files",
        lambda c: c.train(f"checkpoint.export_dir={_afile(c)}"),
        2,
        "checkpoint.export_dir=",
        "is a file: expected a folder for the exported model",
    ),
    "export_dir and logging.dir one folder through a symlink": T(
        "files", _same_via_link, 2, "checkpoint.export_dir and logging.dir are the same folder"
    ),
    "export_dir inside the student through a symlink": T(
        "files", _export_into_student_via_link, 2, "is inside the student's model folder"
    ),
    "an empty run.lock left by a crash": T(
        "files",
        _empty_lock,
        2,
        "run.lock",
    ),
    "run.json is a folder": T(
        "files",
        lambda c: _folder_named(c, "ckpt", "run.json"),
        2,
        "run.json",
    ),
    "logging.dir/tropd_run.json is a folder": T(
        "files",
        lambda c: _folder_named(c, "logs", "tropd_run.json"),
        2,
        "tropd_run.json",
    ),
    "logging.dir/resolved_config.json is a folder": T(
        "files",
        lambda c: _folder_named(c, "logs", "resolved_config.json"),
        2,
        "resolved_config.json",
    ),
    "logging.dir holding the user's own metrics.jsonl": T(
        "files",
        _users_metrics,
        2,
        "logging.dir=",
        "metrics.jsonl",
    ),
}


def _readonly_skip() -> str | None:
    return "running as root: a read-only folder is still writable" if os.geteuid() == 0 else None


def _readonly_logs(ctx: Ctx) -> list:
    logs = ctx.tmp / "ro"
    logs.mkdir()
    logs.chmod(0o500)
    ctx.cleanup.append(lambda: logs.chmod(0o700))
    return ctx.train(f"logging.dir={logs / 'logs'}")


CASES["logging.dir under a read-only folder"] = T(
    "files", _readonly_logs, 2, "logging.dir=", "cannot be written", skip=_readonly_skip
)


# ----------------------------------------------------------------------------- the runner


def _fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parts[len(root.parts)] in ("student", "teacher", "data")
    }


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"the case ran past {CASE_SECONDS} s")


def run_case(case: Case, ctx: Ctx, capsys) -> SimpleNamespace:
    """The case's command in-process: its exit code, output, and the checked config when prepare succeeded."""
    if case.before is not None:
        case.before(ctx)
        capsys.readouterr()
    argv = [str(a) for a in case.argv(ctx)]
    fn = command.prepare if case.run == "train" else cli.main
    res = SimpleNamespace(argv=argv, cfg=None, prepared=None)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        try:
            result = fn(argv)
        except SystemExit as exc:  # argparse: its usage and error on stderr, exit 2
            result = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if isinstance(result, tuple):
        res.cfg, res.prepared = result
        ownership.release_lock(res.cfg.checkpoint.dir)
        result = 0
    res.code = result
    res.out, res.err = capsys.readouterr()
    return res


def _params():
    for name in CASES:
        case = CASES[name]
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_hostile_input(workspace, tmp_path, monkeypatch, capsys, name):
    case = CASES[name]
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name that looks like a hub id never waits on the network
    before = _fingerprint(workspace)
    ctx = Ctx(workspace, tmp_path, monkeypatch)
    try:
        res = run_case(case, ctx, capsys)
    finally:
        for undo in ctx.cleanup:
            undo()
        assert _fingerprint(workspace) == before, "a workspace model or data file changed"
    message = res.err if res.code else res.out + res.err
    assert "Traceback" not in res.out + res.err, message
    assert res.code == case.code, (res.code, message[-2000:])
    for word in case.words:
        assert word in message, (word, message[-2000:])
    for word in case.absent:
        assert word not in message, (word, message[-2000:])
    for path, content in ctx.user.items():
        assert path.is_file() and path.read_bytes() == content, f"the user's file {path} changed"
    if case.then is not None:
        case.then(ctx, res)


def test_the_table_has_at_least_80_cases_in_every_area():
    areas = {}
    for case in CASES.values():
        areas[case.area] = areas.get(case.area, 0) + 1
    assert len(CASES) >= 80 and set(areas) == {"paths", "config", "cli", "data", "numbers", "files"}, areas
