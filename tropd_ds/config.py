"""Run configuration: one YAML or JSON file parsed into typed dataclasses, with `--set` overrides.

Unknown keys are an error that names the key and suggests the closest valid one; values are
checked against the field's type. Paths are resolved relative to the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration problem found before any engine starts."""


GATHER_FRACTION = 0.5  # gather_params auto: a whole model gathered when it takes at most this much of free memory


def gather_fits(need_bytes: float, free_bytes: float) -> bool:
    """The rule of `gather_params: auto`, the run's and the planner's: gather when the whole model's weights take
    at most GATHER_FRACTION of the device's free memory (room left for activations, the KV cache, the rest)."""
    return need_bytes <= GATHER_FRACTION * free_bytes


@dataclass
class StudentConfig:
    path: str = ""  # a Hugging Face model folder
    ds_config: str = ""  # DeepSpeed JSON config for the student's engine (ZeRO-3, optimiser offload as it says)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    micro_batch_size: int = 4  # sequences per forward and backward
    gradient_checkpointing: bool = False  # recompute each layer in backward
    # LoRA adapters {r, alpha (default 2 r), dropout, target_modules (default all-linear)}; the base stays frozen
    # (the `peft` extra). {} = train every parameter.
    lora: dict = field(default_factory=dict)


@dataclass
class TeacherConfig:
    path: str = ""  # a Hugging Face model folder
    ds_config: str = ""  # DeepSpeed JSON config for the teacher's engine (ZeRO-3 inference, offload as it says)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    micro_batch_size: int = 4  # sequences per forward (independent of the student's)
    # score with the whole teacher gathered once per step and ZeRO-3's per-module hooks off (fast; the teacher
    # must fit on one device). False: ZeRO-3 gathers (or fetches from offload) layer by layer.
    # auto: gathered when its weights take at most half of a device's free memory (logged at the start)
    gather_params: bool | str = "auto"
    # a teacher served by `tropd-ds serve-teacher` (http://host:port) instead of one in this job; path and
    # ds_config stay empty, and the service's tokenizer must be the student's
    url: str = ""
    token_file: str = ""  # a file holding the service's shared secret (a service beyond loopback requires one)
    # how long a served teacher that does not answer is retried (with back-off) before the run stops, with a
    # checkpoint of its last completed step; a busy service is waited for, without limit
    wait_minutes: float = 30.0


# Either side's model settings (model folder checks and loading take either).
ModelConfig = StudentConfig | TeacherConfig

# Keys that belong to another section: the "unknown key" refusal says where they went and why.
MOVED = {
    "student.gather_params": "gathering for the teacher's scoring is teacher.gather_params; the student's generation "
    "is rollout.gather_params",
    "teacher.lora": "the teacher is frozen; LoRA applies to the student only (student.lora)",
    "teacher.gradient_checkpointing": "the teacher is frozen and has no backward; it applies to the student only "
    "(student.gradient_checkpointing)",
    "objective.temperature": "the objective compares log-probs at the temperature that sampled them, "
    "rollout.temperature; set that",
}


@dataclass
class DataConfig:
    path: str = ""  # JSON/JSONL/Parquet/Arrow file or a folder saved by `datasets`
    split: str = "train"  # a split of a saved DatasetDict folder or a hub data set (a file holds only train)
    eval_path: str = ""  # held-out prompts with an `answer` column (optional)
    eval_split: str = ""  # the split of eval_path to evaluate on; "" = its only split (several: set this)
    max_prompt_tokens: int = 256  # prompt tokens kept per row (see long_prompts)
    long_prompts: str = "truncate"  # truncate (keep the end) | skip
    shuffle_seed: int = 0  # seed of the per-epoch prompt order
    chat_template: bool = False  # render `prompt` with the tokenizer's chat template
    chat_template_kwargs: dict = field(default_factory=dict)  # the template's own keywords, e.g. enable_thinking
    prompt_column: str = "prompt"  # the prompt: a string, or a list of chat messages
    answer_column: str = "answer"  # held-out rows: the reference answer
    teacher_response_column: str = "teacher_response"  # the teacher's worked response (guidance prefixes)
    messages_column: str = "messages"  # used without a prompt column: a chat whose last assistant turn is the response
    teacher_column: str = "teacher"  # with several teachers (teachers:), the column naming each row's teacher


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8  # global, across ranks
    samples_per_prompt: int = 2  # responses sampled per prompt
    max_new_tokens: int = 64  # the whole response: teacher prefix plus the student's continuation
    temperature: float = 1.0  # sampling temperature, and the temperature of the log-probs the objective compares
    top_p: float = 1.0  # < 1 only for objectives without a log-ratio (fkl_topk, jsd)
    gather_params: bool | str = "auto"  # gather the student for generation; false: layer by layer; auto: if it fits
    micro_batch_size: int = 0  # sequences generated at once per rank; 0 = all of the rank's share
    guidance: bool = True  # off-policy guidance with teacher prefixes
    guidance_max_len: int = 0  # L_max of the cosine schedule; 0 = max_new_tokens
    prefix_source: str = "data"  # data (teacher_response column) | teacher (generated by the teacher)


@dataclass
class ObjectiveConfig:
    name: str = "tropd"  # tropd | opd | eopd | reopold | mask_outlier | clip_outlier | entropy_opd | fkl_topk | jsd
    options: dict = field(default_factory=dict)  # passed to tropd_ds.objectives.loss_fn


@dataclass
class OptimConfig:
    steps: int = 200  # optimiser steps (one rollout batch each)
    lr: float = 5e-6  # peak learning rate
    warmup_steps: int = 0  # linear warm-up steps from 0
    schedule: str = "cosine_with_min_lr"  # a transformers learning-rate schedule (transformers.get_scheduler)
    min_lr_ratio: float = 1.0  # cosine_with_min_lr: decay to lr * min_lr_ratio; 1.0 = constant after warm-up
    schedule_kwargs: dict = field(default_factory=dict)  # the schedule's own arguments, e.g. num_decay_steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = none)
    betas: tuple = (0.9, 0.999)  # AdamW betas, two numbers in [0, 1)
    max_bad_steps: int = 3  # stop after this many consecutive steps skipped for a non-finite loss or gradient


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"  # checkpoints of this run (one run per folder)
    every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones deleted; 0 = keep all)
    resume: bool = True  # continue from the newest checkpoint in dir
    export_dir: str = "runs/export"  # the final student as a Hugging Face folder
    stop_after: int = 0  # end this process after that many steps (with a checkpoint), e.g. for time-limited slots
    # replace another run's checkpoints in `dir`, and a non-empty export_dir that tropd-ds did not export
    overwrite: bool = False


@dataclass
class LoggingConfig:
    dir: str = "runs/logs"  # metrics.jsonl, resolved configs, evaluation records, monitors
    samples_every: int = 10  # log one decoded rollout every this many steps (0 = never)
    progress: bool = True  # a progress bar on rank 0


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 = only before and after training
    max_prompts: int = 200  # held-out prompts evaluated (the first ones)
    samples: int = 1  # avg@n
    max_new_tokens: int = 64  # tokens generated per held-out answer
    temperature: float = 0.0  # 0 = greedy
    answer_check: str = "auto"  # exact | math_verify (the `eval` extra) | auto: math_verify when installed
    # a regular expression for the final answer (its one group, else the whole match; the last match counts); a
    # completion without a match is wrong. Empty: the last \boxed{...}, else the number after '#', else the last number
    answer_pattern: str = ""


@dataclass
class RunConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several teachers instead of one: {name: a teacher section (path and ds_config, or url)}, each row of the data
    # scored by the teacher its data.teacher_column names; every teacher shares the student's tokenizer
    teachers: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # seed of sampling and initialisation (rank r uses seed + r)
    # how long a collective waits for the slowest rank before the run is ended (the process group's time-out;
    # it replaces DeepSpeed's 10-minute default and DEEPSPEED_TIMEOUT). A rank that decodes long answers alone
    # (gathered generation, evaluation) keeps the others waiting in their next collective for that long
    collective_timeout_minutes: float = 240.0


PATH_FIELDS = {
    ("student", "path"),
    ("student", "ds_config"),
    ("teacher", "path"),
    ("teacher", "ds_config"),
    ("teacher", "token_file"),
    ("data", "path"),
    ("data", "eval_path"),
    ("checkpoint", "dir"),
    ("checkpoint", "export_dir"),
    ("logging", "dir"),
}
# Model and data fields that may name a Hugging Face hub repository instead of a local path.
HUB_FIELDS = {("student", "path"), ("teacher", "path"), ("data", "path"), ("data", "eval_path")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and Path(value).suffix.lower() not in {
        ".json",
        ".jsonl",
        ".parquet",
        ".arrow",
        ".csv",
        ".yaml",
    }


def is_hub_id(value: str, base: Path) -> bool:
    """A path that exists relative to the config (or starts with ./, ../, ~) is a file path; otherwise a
    name shaped like `org/name` is a hub id, for from_pretrained / load_dataset."""
    if value.startswith((".", "~", "/")) or (base / value).exists():
        return False
    return looks_like_hub_id(value)


# (section, field): (lowest, lowest included, highest, highest included); None = unbounded.
RANGES = {
    ("student", "micro_batch_size"): (1, True, None, False),
    ("teacher", "micro_batch_size"): (1, True, None, False),
    ("teacher", "wait_minutes"): (0, False, None, False),
    ("data", "max_prompt_tokens"): (1, True, None, False),
    ("rollout", "prompts_per_step"): (1, True, None, False),
    ("rollout", "samples_per_prompt"): (1, True, None, False),
    ("rollout", "max_new_tokens"): (1, True, None, False),
    ("rollout", "temperature"): (0, False, None, False),
    ("rollout", "top_p"): (0, False, 1, True),
    ("rollout", "guidance_max_len"): (0, True, None, False),
    ("rollout", "micro_batch_size"): (0, True, None, False),
    ("optim", "steps"): (1, True, None, False),
    ("optim", "lr"): (0, False, None, False),
    ("optim", "warmup_steps"): (0, True, None, False),
    ("optim", "min_lr_ratio"): (0, True, 1, True),
    ("optim", "weight_decay"): (0, True, None, False),
    ("optim", "grad_clip"): (0, True, None, False),
    ("optim", "max_bad_steps"): (1, True, None, False),
    ("checkpoint", "every"): (0, True, None, False),
    ("checkpoint", "keep_last"): (0, True, None, False),
    ("checkpoint", "stop_after"): (0, True, None, False),
    ("logging", "samples_every"): (0, True, None, False),
    ("eval", "every"): (0, True, None, False),
    ("eval", "max_prompts"): (1, True, None, False),
    ("eval", "samples"): (1, True, None, False),
    ("eval", "max_new_tokens"): (1, True, None, False),
    ("eval", "temperature"): (0, True, None, False),
}


MAX_TIMEOUT_MINUTES = 7 * 24 * 60
MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")


def _range_text(lo, lo_in, hi, hi_in) -> str:
    if hi is None:
        return f"a number {'>=' if lo_in else '>'} {lo}"
    return f"a number in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


CHOICES = {
    ("data", "long_prompts"): ("truncate", "skip"),
    ("eval", "answer_check"): ("auto", "exact", "math_verify"),
    # transformers' schedules that need no metric (reduce_lr_on_plateau and greedy do)
    ("optim", "schedule"): (
        "cosine_with_min_lr",
        "cosine_warmup_with_min_lr",
        "constant_with_warmup",
        "constant",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
        "warmup_stable_decay",
    ),  # fmt: skip
    ("rollout", "prefix_source"): ("data", "teacher"),
    ("student", "dtype"): ("float32", "bfloat16", "float16"),
    ("teacher", "dtype"): ("float32", "bfloat16", "float16"),
}


def check_range(key: str, value, lo, lo_in, hi, hi_in) -> None:
    """`key`'s value within RANGES' limits, or a ConfigError naming it and what is accepted."""
    bad = (
        not math.isfinite(value)
        or (value < lo if lo_in else value <= lo)
        or (hi is not None and (value > hi if hi_in else value >= hi))
    )
    if bad:
        hint = " (0 is greedy decoding, which on-policy sampling cannot use)" if key == "rollout.temperature" else ""
        raise ConfigError(f"{key}={value!r}: expected {_range_text(lo, lo_in, hi, hi_in)}{hint}")


def teacher_sections(cfg: RunConfig) -> list[tuple[str, TeacherConfig]]:
    """Each teacher of the run with its config key: `teacher`, or `teachers.<name>` for each of several."""
    if cfg.teachers:
        return [(f"teachers.{name}", t) for name, t in cfg.teachers.items()]
    return [("teacher", cfg.teacher)]


def sections(cfg: RunConfig, section: str) -> list[tuple[str, object]]:
    """The config objects a per-section rule applies to, with their keys: a teacher rule applies to each teacher."""
    return teacher_sections(cfg) if section == "teacher" else [(section, getattr(cfg, section))]


TEACHER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
RESERVED_TEACHER_NAMES = ("wait",)  # time_teacher_<name>_s would be the run's time_teacher_wait_s


def build_teachers(cfg: RunConfig) -> dict[str, TeacherConfig]:
    """`teachers:` as {name: TeacherConfig}, checked: two or more, each named as a metric key can hold, and no
    `teacher:` section beside them."""
    given = cfg.teachers
    if not given:
        return {}
    if len(given) < 2:
        raise ConfigError(
            f"teachers has one entry ({', '.join(map(str, given))}): several teachers means two or more; a single "
            "teacher goes in the teacher section"
        )
    out = {}
    for name, section in given.items():
        if not isinstance(name, str) or not TEACHER_NAME.match(name) or name in RESERVED_TEACHER_NAMES:
            raise ConfigError(
                f"teachers: the name {name!r} is not accepted: expected a letter, then letters, digits or _ (at most "
                f"64; it names the teacher's metrics, teacher_<name>_trust_fraction), other than "
                f"{', '.join(RESERVED_TEACHER_NAMES)} (a metric of the run's own)"
            )
        out[name] = _build(TeacherConfig, section, f"teachers.{name}.")  # `name:` alone is refused: not a mapping
    default = TeacherConfig()
    changed = [f.name for f in dataclasses.fields(default) if getattr(cfg.teacher, f.name) != getattr(default, f.name)]
    if changed:
        raise ConfigError(
            f"teacher.{changed[0]} is set beside teachers ({', '.join(out)}): a run has one teacher (the teacher "
            "section) or several (teachers, one section each); move its settings into the teachers' sections"
        )
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(where: str, value, tp):
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:  # `--set data.eval_path=` (empty) clears a path
            return ""
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif origin in (typing.Union, types.UnionType):
        return value
    raise ConfigError(f"{where}={value!r}: expected {getattr(tp, '__name__', tp)}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        kind = type(data).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{prefix.removesuffix('.') or 'config'} is {article} {kind}: expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(
                f"unknown config key {key!r} ({type(key).__name__}) in {prefix.removesuffix('.') or 'the top level'}: "
                f"expected a name, one of {', '.join(names)}"
            )
        if key not in names:
            moved = re.sub(r"^teachers\.[^.]+\.", "teacher.", where)  # each of several teachers is a teacher section
            hint = f": {MOVED[moved]}" if moved in MOVED else _suggest(key, names)
            raise ConfigError(f"unknown config key {where!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where + ".")
        else:
            kwargs[key] = _coerce(where, value, tp)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. objective.name=opd")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip() not in ("", "~", "null", "Null", "NULL"):
        value = raw  # YAML reads '#...' as a comment: a value that starts with '#' (a pattern) is kept as written
    return key.strip().split("."), value


class DuplicateKey(ValueError):
    pass


def _unique_json_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(f"the key {key!r} appears twice in one object: the second would silently win")
        seen[key] = value
    return seen


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""


def _construct_unique_mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden, that is its use
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            mark = key_node.start_mark
            raise DuplicateKey(
                f"line {mark.line + 1}: the key {key!r} appears twice in one mapping: the second would silently win"
            )
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_file(path: Path):
    """A YAML or JSON file's content; a syntax error names the file, line and column."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from exc
    try:
        return (
            json.loads(text, object_pairs_hook=_unique_json_keys)
            if path.suffix == ".json"
            else yaml.load(text, Loader=_UniqueKeyLoader)
        )
    except DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: JSON syntax error: {exc.msg}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        position = getattr(exc, "position", None)  # a ReaderError (a character YAML does not allow): no mark
        if mark is None and isinstance(position, int):
            line = text.count("\n", 0, position) + 1
            where = f"{path}:{line}:{position - (text.rfind(chr(10), 0, position) + 1) + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigError(f"{where}: YAML syntax error: {problem}{f' ({context})' if context else ''}") from exc


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Parse `path` (YAML or JSON) and apply `--set key.sub=value` overrides."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            if path.is_dir():
                raise ConfigError(f"config file {str(path)!r} is a folder: expected a YAML or JSON run config file")
            if path.exists() and not path.is_file():
                raise ConfigError(f"config file {str(path)!r} is not a regular file (a pipe or a device?)")
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
        except OSError as exc:  # a name too long, a loop of links
            raise ConfigError(f"config file {str(path)!r} cannot be used: {exc.strerror or exc}") from exc
        data = parse_file(path)
        if data is None:  # an empty file
            data = {}
        if not isinstance(data, dict):
            _build(RunConfig, data, "")  # the refusal of a config that is not a mapping
        base = path.resolve().parent
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
        if len(keys) == 1 and isinstance(value, dict) and isinstance(node.get(keys[0]), dict):
            node[keys[0]] = {**node[keys[0]], **value}  # `--set optim={lr: 2e-3}` sets those keys of the section
        else:
            node[keys[-1]] = value
    cfg = _build(RunConfig, data, "")
    cfg.teachers = build_teachers(cfg)
    for section, name in PATH_FIELDS:
        for _, sub in sections(cfg, section):
            value = getattr(sub, name)
            if value.startswith("~"):  # the user's home folder, as a shell would read it
                value = os.path.expanduser(value)
                setattr(sub, name, value)
            hub = (section, name) in HUB_FIELDS and is_hub_id(value, base)
            if value and not Path(value).is_absolute() and not hub:
                setattr(sub, name, str((base / value).resolve()))
    for section, name in PATH_FIELDS:
        for label, sub in sections(cfg, section):
            value = getattr(sub, name)
            if value and any(len(part.encode()) > 255 for part in Path(value).parts):
                raise ConfigError(
                    f"{label}.{name}={value!r}: a part of the path is too long (over 255 bytes, a file name's limit)"
                )
    for (section, name), limits in RANGES.items():
        for label, sub in sections(cfg, section):
            check_range(f"{label}.{name}", getattr(sub, name), *limits)
    for (section, name), allowed in CHOICES.items():
        for label, sub in sections(cfg, section):
            value = getattr(sub, name)
            if value not in allowed:
                raise ConfigError(f"{label}.{name}={value!r}: expected one of {', '.join(allowed)}")
    for key in ("prompt_column", "answer_column", "teacher_response_column", "messages_column", "teacher_column"):
        if not getattr(cfg.data, key).strip():
            raise ConfigError(f"data.{key} is empty: expected the name of a column of the data set")

    for name, value in (("seed", cfg.seed), ("data.shuffle_seed", cfg.data.shuffle_seed)):
        if not 0 <= value < 2**32:
            raise ConfigError(f"{name}={value}: expected an integer in [0, 2**32)")
    timeout = cfg.collective_timeout_minutes
    if not math.isfinite(timeout) or timeout <= 0 or timeout > MAX_TIMEOUT_MINUTES:
        raise ConfigError(
            f"collective_timeout_minutes={timeout!r}: expected a number of minutes > 0 and at most "
            f"{MAX_TIMEOUT_MINUTES} (a week), e.g. 240 for answers of 8k tokens"
        )
    if cfg.optim.min_lr_ratio != 1.0 and cfg.optim.schedule not in MIN_LR_SCHEDULES:
        raise ConfigError(
            f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} with optim.schedule={cfg.optim.schedule!r}: the ratio "
            f"applies to {' and '.join(MIN_LR_SCHEDULES)}; remove it or pass the schedule's own arguments in "
            "optim.schedule_kwargs"
        )
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(_is_fraction(b) for b in betas):
        raise ConfigError(f"optim.betas={list(betas)!r}: expected two numbers in [0, 1)")
    if cfg.eval.samples > 1 and cfg.eval.temperature == 0:
        raise ConfigError(
            f"eval.samples={cfg.eval.samples} with eval.temperature=0: greedy decoding gives {cfg.eval.samples} "
            "identical completions; set eval.temperature > 0 for avg@n, or eval.samples=1"
        )
    answer_pattern(cfg.eval.answer_pattern)
    check_sampling(cfg)
    check_outputs(cfg)
    for where, section in [*teacher_sections(cfg), ("rollout", cfg.rollout)]:
        value = section.gather_params
        if isinstance(value, str) and value.lower() in ("true", "false"):
            section.gather_params = value = value.lower() == "true"
        if value not in (True, False, "auto") or (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{where}.gather_params={value!r}: expected true, false or auto")
    if cfg.student.lora:
        lora_settings(cfg.student.lora)
    check_served_teacher(cfg)
    return cfg


_URL = re.compile(r"^https?://[^/\s:]+(:[0-9]{1,5})?/?$|^https?://\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?/?$")


def check_served_teacher(cfg: RunConfig) -> None:
    """teacher.url names a teacher service: then no local teacher settings, and no prefixes the teacher generates.
    Several teachers (teachers:): each checked so, no generated prefixes, and a routing column of its own."""
    for key, t in teacher_sections(cfg):
        check_one_served_teacher(cfg, key, t)
    if not cfg.teachers:
        return
    if cfg.rollout.guidance and cfg.rollout.prefix_source == "teacher":
        raise ConfigError(
            f"rollout.prefix_source='teacher' with several teachers ({', '.join(cfg.teachers)}): prefixes are "
            "generated by one teacher; use rollout.prefix_source=data (a teacher_response column written by each "
            "row's teacher) or rollout.guidance=false"
        )
    d = cfg.data
    taken = {
        "data.prompt_column": d.prompt_column,
        "data.answer_column": d.answer_column,
        "data.teacher_response_column": d.teacher_response_column,
        "data.messages_column": d.messages_column,
    }
    for key, column in taken.items():
        if d.teacher_column in (column, key.removeprefix("data.").removesuffix("_column")):
            raise ConfigError(
                f"data.teacher_column={d.teacher_column!r} is also {key}={column!r} or its canonical name: the column "
                "naming each row's teacher must be a column of its own"
            )


def check_one_served_teacher(cfg: RunConfig, key: str, t: TeacherConfig) -> None:
    if not t.url:
        if t.token_file:
            raise ConfigError(
                f"{key}.token_file={t.token_file!r} without {key}.url: the secret is for a served teacher"
            )
        return
    if not _URL.match(t.url):
        raise ConfigError(f"{key}.url={t.url!r}: expected http://host:port (the address serve-teacher logs)")
    local = [name for name in ("path", "ds_config") if getattr(t, name)]
    if local:
        raise ConfigError(
            f"{key}.url={t.url!r} with {key}.{f' and {key}.'.join(local)} set: a run uses a served teacher "
            "(url) or one in this job (path and ds_config), not both; remove one"
        )
    if cfg.rollout.guidance and cfg.rollout.prefix_source == "teacher":
        raise ConfigError(
            f"rollout.prefix_source='teacher' with {key}.url={t.url!r}: a served teacher scores, it does not "
            "generate prefixes; use rollout.prefix_source=data (a teacher_response column)"
        )


LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def answer_pattern(value: str, what: str = "eval.answer_pattern") -> re.Pattern | None:
    """The compiled final-answer pattern (None when empty); a bad one is a ConfigError that names it."""
    if not value:
        return None
    try:
        pattern = re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{what}={value!r} is not a regular expression: {exc}") from None
    if pattern.groups > 1:
        raise ConfigError(
            f"{what}={value!r} has {pattern.groups} groups: expected at most one, the answer (write others as (?:...))"
        )
    return pattern


def lora_settings(lora: dict) -> dict:
    """`student.lora` checked, with defaults: alpha = 2 r, dropout 0, target_modules all-linear."""
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"student.lora has unknown keys {unknown}: accepted {', '.join(LORA_KEYS)}")
    r = lora.get("r", 16)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"student.lora.r={r!r}: expected an integer >= 1")
    alpha = lora.get("alpha", 2 * r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"student.lora.alpha={alpha!r}: expected a number > 0")
    dropout = lora.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"student.lora.dropout={dropout!r}: expected a number in [0, 1)")
    targets = lora.get("target_modules", "all-linear")
    if targets != "all-linear" and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(
            f"student.lora.target_modules={targets!r}: expected 'all-linear' or a list of module names "
            "(e.g. [q_proj, v_proj])"
        )
    return {"r": r, "alpha": float(alpha), "dropout": float(dropout), "target_modules": targets}


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


OUTPUT_FIELDS = (("checkpoint", "dir"), ("checkpoint", "export_dir"), ("logging", "dir"))
INPUT_FIELDS = (("student", "path"), ("teacher", "path"))  # a teacher's is each teacher's (teachers:)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_outside_models(cfg: RunConfig, key: str, value: str) -> None:
    """The output folder `value` (named `key` in errors) is neither a model folder of `cfg` nor inside one."""
    out = Path(os.path.realpath(value))
    for section, name in INPUT_FIELDS:
        for label, sub in sections(cfg, section):
            model = getattr(sub, name)
            if model and Path(model).exists() and _inside(out, Path(os.path.realpath(model))):
                raise ConfigError(
                    f"{key}={value!r} is {'the' if out == Path(os.path.realpath(model)) else 'inside the'} "
                    f"{label}'s model folder ({label}.{name}={model!r}): it would write over the model it "
                    "reads; expected a folder outside it"
                )


def check_outputs(cfg: RunConfig) -> None:
    """Output folders are named, distinct, and never a model folder or inside one: a run writes nothing
    the user did not give it."""
    outputs = {}
    for section, name in OUTPUT_FIELDS:
        value = getattr(getattr(cfg, section), name)
        if not value.strip():
            raise ConfigError(
                f"{section}.{name} is empty: expected a folder for the run's "
                f"{'logs' if section == 'logging' else 'checkpoints' if name == 'dir' else 'exported model'} "
                "(an empty path would write into the current directory)"
            )
        outputs[f"{section}.{name}"] = Path(os.path.realpath(value))
    for key, out in outputs.items():
        check_outside_models(cfg, key, str(out))
    keys = list(outputs)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if outputs[a] == outputs[b]:
                raise ConfigError(
                    f"{a} and {b} are the same folder ({str(outputs[a])!r}): logs, checkpoints and the exported model "
                    "each need their own (their files would mix: both write config.json)"
                )


# Objectives whose loss uses no log-ratio of the sampled token (top-k forward KL on the student's states).
RATIO_FREE_OBJECTIVES = ("fkl_topk", "jsd")


def check_sampling(cfg: RunConfig) -> None:
    """One sampling distribution: r and P_trust are log-ratios under the policy that sampled (the objective
    takes its temperature from the rollout), so nothing may truncate what the student samples from."""
    r, o = cfg.rollout, cfg.objective
    if r.top_p < 1 and o.name not in RATIO_FREE_OBJECTIVES:
        raise ConfigError(
            f"rollout.top_p={r.top_p} with objective.name={o.name!r}: top-p sampling draws from a truncated "
            "distribution, so "
            f"the student's log-probs would not be those of the policy that sampled; expected rollout.top_p=1.0 "
            f"(top-p is accepted only for {', '.join(RATIO_FREE_OBJECTIVES)})"
        )
    if r.guidance_max_len > r.max_new_tokens:
        raise ConfigError(
            f"rollout.guidance_max_len={r.guidance_max_len} exceeds rollout.max_new_tokens={r.max_new_tokens}: a "
            "teacher prefix "
            "counts towards the response length; expected at most max_new_tokens (0 = max_new_tokens)"
        )


def _field_comments(cls) -> dict[str, str]:
    """Each field's meaning: its trailing comment, or the comment lines just above it (the dataclass source
    is the one place the fields are documented)."""
    import inspect

    docs, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        found = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if found:
            docs[found.group(1)] = found.group(2) or " ".join(above)
        above = []
    return docs


def describe_fields() -> list[dict]:
    """Every config field: key, type, default, what is accepted, and one line of meaning."""
    out = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        if not dataclasses.is_dataclass(cls):
            meaning = _field_comments(RunConfig)[section.name]
            accepted = {
                "seed": "an integer in [0, 2**32)",
                "collective_timeout_minutes": f"a number > 0, at most {MAX_TIMEOUT_MINUTES} (a week)",
                "teachers": "a mapping of two or more names (a letter, then letters, digits or _) to teacher sections",
            }
            default = section.default_factory() if section.default is dataclasses.MISSING else section.default
            out.append({"key": section.name, "type": cls.__name__, "default": default,
                        "accepted": accepted[section.name], "meaning": meaning})  # fmt: skip
            continue
        comments, hints, defaults = _field_comments(cls), typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            where = (section.name, f.name)
            if where in RANGES:
                accepted = _range_text(*RANGES[where])
            elif where in CHOICES:
                accepted = "one of " + ", ".join(CHOICES[where])
            elif where in PATH_FIELDS:
                accepted = "a path (relative to the config file)" + (" or a hub id" if where in HUB_FIELDS else "")
            elif f.name == "gather_params":
                accepted = "true, false or auto"
            else:
                accepted = {bool: "true or false", dict: "a mapping", tuple: "a list", str: "a string"}.get(
                    hints[f.name], hints[f.name].__name__
                )
            out.append({
                "key": f"{section.name}.{f.name}",
                "type": "bool or auto"
                if f.name == "gather_params"
                else getattr(hints[f.name], "__name__", str(hints[f.name])),
                "default": getattr(defaults, f.name),
                "accepted": accepted,
                "meaning": comments.get(f.name, ""),
            })  # fmt: skip
    return out


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def micro_batches_per_rank(cfg: RunConfig, world: int) -> int:
    """The student's gradient-accumulation steps: each rank's rollouts (prompts_per_step / ranks x
    samples_per_prompt) in micro-batches of student.micro_batch_size (the pre-flight checks both divide)."""
    return cfg.rollout.prompts_per_step // world * cfg.rollout.samples_per_prompt // cfg.student.micro_batch_size


def read_ds_config(path: str) -> dict:
    """A DeepSpeed JSON config as a dict, or a ConfigError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path!r} holds a {type(data).__name__}: expected a JSON object")
    return data
