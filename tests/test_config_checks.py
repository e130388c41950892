"""The config checks of tropd_ds/config.py, in-process and exact: each refusal's message (the key, the bad value
and what is accepted) and both sides of each boundary, so that a changed operator, constant or word fails here.
No launches and no model folders: a few YAML files in tmp_path and RunConfig objects built directly."""

from __future__ import annotations

import math
import os
import re
import sys
import typing
from pathlib import Path

import pytest
import yaml

from tropd_ds import config as C
from tropd_ds.config import ConfigError, RunConfig, load_config

INF, NAN = math.inf, math.nan


def refusal(fn, *args) -> str:
    """The message of the ConfigError that fn(*args) raises."""
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def nested(flat: dict) -> dict:
    """{"optim.lr": 1.0} -> {"optim": {"lr": 1.0}}"""
    out: dict = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return out


def write(tmp: Path, flat: dict | None = None, text: str | None = None, name: str = "run.yaml") -> Path:
    path = tmp / name
    path.write_text(text if text is not None else yaml.safe_dump(nested(flat or {})))
    return path


def load(tmp: Path, flat: dict | None = None, *overrides: str) -> RunConfig:
    return load_config(write(tmp, flat), list(overrides))


def load_refusal(tmp: Path, flat: dict | None = None, *overrides: str) -> str:
    return refusal(load, tmp, flat, *overrides)


def outputs_config(tmp: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.checkpoint.dir = str(tmp / "ckpt")
    cfg.checkpoint.export_dir = str(tmp / "export")
    cfg.logging.dir = str(tmp / "logs")
    return cfg


# ----------------------------------------------------------------------------- lora_settings

LORA_DEFAULTS = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}


def test_lora_settings_of_an_empty_mapping_are_r16_alpha32_dropout0_all_linear():
    out = C.lora_settings({})
    assert out == LORA_DEFAULTS
    assert type(out["r"]) is int and type(out["alpha"]) is float and type(out["dropout"]) is float


@pytest.mark.parametrize("r", [1, 2, 5, 16, 1024])
def test_lora_alpha_defaults_to_twice_r_as_a_float(r):
    out = C.lora_settings({"r": r})
    assert out == {"r": r, "alpha": float(2 * r), "dropout": 0.0, "target_modules": "all-linear"}
    assert type(out["alpha"]) is float


def test_lora_settings_keep_every_given_key_with_alpha_and_dropout_as_floats():
    given = {"r": 8, "alpha": 3, "dropout": 0, "target_modules": ["q_proj", "v_proj"]}
    out = C.lora_settings(given)
    assert out == {"r": 8, "alpha": 3.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    assert type(out["alpha"]) is float and type(out["dropout"]) is float


def test_lora_settings_do_not_change_the_given_mapping():
    given = {"r": 4}
    C.lora_settings(given)
    assert given == {"r": 4}


@pytest.mark.parametrize(
    ("lora", "unknown"),
    [
        ({"rank": 4}, "['rank']"),
        ({"rank": 4, "bias": "none", "r": 4}, "['bias', 'rank']"),
        ({"target_module": ["q"], "Alpha": 2, "lora_dropout": 0.1}, "['Alpha', 'lora_dropout', 'target_module']"),
    ],
)
def test_lora_unknown_keys_are_listed_sorted_with_the_accepted_ones(lora, unknown):
    assert refusal(C.lora_settings, lora) == (
        f"student.lora has unknown keys {unknown}: accepted r, alpha, dropout, target_modules"
    )


@pytest.mark.parametrize("r", [0, -1, True, False, 2.0, 16.5, "8", None, [8]])
def test_lora_r_refuses_anything_but_an_integer_from_1(r):
    assert refusal(C.lora_settings, {"r": r}) == f"student.lora.r={r!r}: expected an integer >= 1"


def test_lora_r_of_1_is_the_smallest_accepted():
    assert C.lora_settings({"r": 1})["r"] == 1


def test_lora_r_is_checked_before_alpha():
    assert refusal(C.lora_settings, {"r": 0, "alpha": -1}) == "student.lora.r=0: expected an integer >= 1"


@pytest.mark.parametrize("alpha", [0, 0.0, -1, -1e-9, True, False, "2", None, INF, -INF, NAN, [2]])
def test_lora_alpha_refuses_anything_but_a_finite_number_above_0(alpha):
    assert refusal(C.lora_settings, {"alpha": alpha}) == f"student.lora.alpha={alpha!r}: expected a number > 0"


@pytest.mark.parametrize(("alpha", "kept"), [(1e-9, 1e-9), (1, 1.0), (0.5, 0.5), (1e6, 1e6)])
def test_lora_alpha_accepts_any_positive_number(alpha, kept):
    assert C.lora_settings({"alpha": alpha})["alpha"] == kept


@pytest.mark.parametrize("dropout", [1, 1.0, 1.5, -0.01, -1, True, False, "0.1", None, INF, NAN])
def test_lora_dropout_refuses_anything_outside_0_to_1_excluded(dropout):
    assert refusal(C.lora_settings, {"dropout": dropout}) == (
        f"student.lora.dropout={dropout!r}: expected a number in [0, 1)"
    )


@pytest.mark.parametrize(("dropout", "kept"), [(0, 0.0), (0.0, 0.0), (0.1, 0.1), (0.999, 0.999)])
def test_lora_dropout_accepts_0_up_to_just_below_1(dropout, kept):
    out = C.lora_settings({"dropout": dropout})
    assert out["dropout"] == kept and type(out["dropout"]) is float


@pytest.mark.parametrize(
    "targets",
    [[], [""], ["q_proj", ""], ["q_proj", 3], [3], ["q_proj", None], "q_proj", "all_linear", ("q_proj",), None, {}],
)
def test_lora_target_modules_refuse_anything_but_all_linear_or_a_list_of_names(targets):
    assert refusal(C.lora_settings, {"target_modules": targets}) == (
        f"student.lora.target_modules={targets!r}: expected 'all-linear' or a list of module names "
        "(e.g. [q_proj, v_proj])"
    )


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]])
def test_lora_target_modules_accept_all_linear_or_a_non_empty_list_of_names(targets):
    assert C.lora_settings({"target_modules": targets})["target_modules"] == targets


# ----------------------------------------------------------------------------- _suggest


def test_suggest_names_the_closest_valid_key():
    assert C._suggest("stpes", ["lr", "steps", "warmup_steps"]) == "; did you mean 'steps'?"


def test_suggest_names_only_the_best_of_several_close_keys():
    assert C._suggest("step", ["warmup_steps", "steps"]) == "; did you mean 'steps'?"


def test_suggest_accepts_a_key_exactly_half_similar():
    assert C._suggest("ab", ["ax"]) == "; did you mean 'ax'?"  # difflib ratio 2*1/4 = 0.5, the cut-off


def test_suggest_lists_every_valid_key_in_order_when_none_is_half_similar():
    # "abcd" vs "abxyz": ratio 2*2/9 = 0.44, below the cut-off
    assert C._suggest("abcd", ["abxyz", "lr", "zz"]) == "; valid keys: abxyz, lr, zz"


def test_suggest_of_a_far_key_among_the_config_sections_lists_them_all():
    names = ["student", "teacher", "data", "rollout"]
    assert C._suggest("zzzz", names) == "; valid keys: student, teacher, data, rollout"


# ----------------------------------------------------------------------------- looks_like_hub_id / is_hub_id


@pytest.mark.parametrize(
    "value",
    [
        "org/name",
        "a/b",
        "0/9",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "meta-llama/Llama-3.2-1B",
        "org_1/name_2",
        "o.r-g/n.a-m_e",
        "org/model.v1",
        "org/weights.safetensors",
        "org/data.txt",
    ],
)
def test_looks_like_hub_id_accepts_org_slash_name(value):
    assert C.looks_like_hub_id(value) is True


@pytest.mark.parametrize(
    "value",
    [
        "",
        "name",
        "org/",
        "/name",
        "org//name",
        "a/b/c",
        "org/na me",
        "org /name",
        ".org/name",
        "org/.name",
        "-org/name",
        "org/-name",
        "_org/name",
        "org/_name",
        "./org/name",
        "~/name",
        "org\\name",
        "org/name!",
    ],
)
def test_looks_like_hub_id_refuses_other_shapes(value):
    assert C.looks_like_hub_id(value) is False


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".arrow", ".csv", ".yaml"])
def test_looks_like_hub_id_refuses_a_data_or_config_file_name_in_any_case(suffix):
    assert C.looks_like_hub_id(f"org/data{suffix}") is False
    assert C.looks_like_hub_id(f"org/data{suffix.upper()}") is False
    assert C.looks_like_hub_id(f"org/data{suffix}.v2") is True  # the last suffix counts


def test_is_hub_id_accepts_org_slash_name_that_does_not_exist_under_base(tmp_path):
    assert C.is_hub_id("org/name", tmp_path) is True


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_is_hub_id_refuses_a_name_that_exists_relative_to_base(tmp_path, kind):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir() if kind == "folder" else (tmp_path / "org" / "name").write_text("x")
    assert C.is_hub_id("org/name", tmp_path) is False
    assert C.is_hub_id("org/other", tmp_path) is True


def test_is_hub_id_looks_under_base_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd" / "org" / "name").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert C.is_hub_id("org/name", tmp_path / "base") is True


@pytest.mark.parametrize("value", ["./org/name", "../org/name", "~/name", "/org/name", "org/data.jsonl", "name", ""])
def test_is_hub_id_refuses_explicit_paths_and_other_shapes(tmp_path, value):
    assert C.is_hub_id(value, tmp_path) is False


# ----------------------------------------------------------------------------- _range_text


@pytest.mark.parametrize(
    ("bounds", "text"),
    [
        ((1, True, None, False), "a number >= 1"),
        ((0, True, None, False), "a number >= 0"),
        ((0, False, None, False), "a number > 0"),
        ((0, False, 1, True), "a number in (0, 1]"),
        ((0, True, 1, True), "a number in [0, 1]"),
        ((0, True, 1, False), "a number in [0, 1)"),
        ((0, False, 1, False), "a number in (0, 1)"),
        ((-2, True, 7.5, True), "a number in [-2, 7.5]"),
    ],
)
def test_range_text_writes_the_bounds_with_their_brackets(bounds, text):
    assert C._range_text(*bounds) == text


# ----------------------------------------------------------------------------- _coerce


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        (True, bool, True),
        (False, bool, False),
        ("true", bool, True),
        ("True", bool, True),
        ("TRUE", bool, True),
        ("false", bool, False),
        ("False", bool, False),
        ("FALSE", bool, False),
        (3, int, 3),
        (0, int, 0),
        (-2, int, -2),
        (3, float, 3.0),
        (2.5, float, 2.5),
        (0, float, 0.0),
        ("3e-3", float, 0.003),
        ("1", float, 1.0),
        ("inf", float, INF),
        ("x", str, "x"),
        ("", str, ""),
        (None, str, ""),
        ({"a": 1}, dict, {"a": 1}),
        ({}, dict, {}),
        ({"k": 2}, dict[str, int], {"k": 2}),
        ([0.9, 0.99], tuple, (0.9, 0.99)),
        ((1, 2), tuple, (1, 2)),
        ([], tuple, ()),
        ([0.5, 0.5], tuple[float, float], (0.5, 0.5)),
        (5, typing.Optional[int], 5),  # noqa: UP045 (typing.Union's origin, not types.UnionType's)
        (7, int | None, 7),
    ],
)
def test_coerce_accepts_the_values_of_each_type(value, tp, expected):
    out = C._coerce("sec.key", value, tp)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("value", "tp", "name"),
    [
        (1, bool, "bool"),
        (0, bool, "bool"),
        ("yes", bool, "bool"),
        ("1", bool, "bool"),
        (" true", bool, "bool"),
        (None, bool, "bool"),
        (True, int, "int"),
        (False, int, "int"),
        ("3", int, "int"),
        (3.0, int, "int"),
        (None, int, "int"),
        (True, float, "float"),
        ("fast", float, "float"),
        (None, float, "float"),
        ([1.0], float, "float"),
        (3, str, "str"),
        (True, str, "str"),
        (["a"], str, "str"),
        ([], dict, "dict"),
        ("a=1", dict, "dict"),
        (None, dict, "dict"),
        ([["a", 1]], dict[str, int], "dict"),
        ("ab", tuple, "tuple"),
        ({"a": 1}, tuple, "tuple"),
        (None, tuple, "tuple"),
        (0.9, tuple, "tuple"),
        (0.9, tuple[float, float], "tuple"),
        ([1], list, "list"),
    ],
)
def test_coerce_refuses_a_value_of_another_type_naming_key_value_and_type(value, tp, name):
    assert refusal(C._coerce, "sec.key", value, tp) == f"sec.key={value!r}: expected {name}"


# ----------------------------------------------------------------------------- _parse_override


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("objective.name=opd", ["objective", "name"], "opd"),
        ("optim.steps=5", ["optim", "steps"], 5),
        ("optim.lr=0.5", ["optim", "lr"], 0.5),
        ("optim.lr=3e-3", ["optim", "lr"], "3e-3"),  # YAML 1.1: no dot, a string (_coerce reads it as a float)
        ("rollout.guidance=false", ["rollout", "guidance"], False),
        ("seed=3", ["seed"], 3),
        ("a.b=c=d", ["a", "b"], "c=d"),
        (" optim.steps = 7", ["optim", "steps"], 7),
        ("optim.betas=[0.9, 0.95]", ["optim", "betas"], [0.9, 0.95]),
        ("objective.options={k: 2}", ["objective", "options"], {"k": 2}),
        ("k=", ["k"], None),
        ("k=  ", ["k"], None),
        ("k=~", ["k"], None),
        ("k=null", ["k"], None),
        ("k=Null", ["k"], None),
        ("k=NULL", ["k"], None),
        ("k= null ", ["k"], None),
        ("eval.answer_pattern=#### (\\d+)", ["eval", "answer_pattern"], "#### (\\d+)"),
        ("k=# x", ["k"], "# x"),
        ("k=[1, 2", ["k"], "[1, 2"),  # not YAML: kept as written
        ("k='open", ["k"], "'open"),
    ],
)
def test_parse_override_splits_the_key_on_dots_and_reads_the_value_as_yaml(text, keys, value):
    assert C._parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["objective.name", "", "seed:3"])
def test_parse_override_without_an_equals_sign_is_refused_with_an_example(text):
    assert refusal(C._parse_override, text) == f"--set {text!r}: expected KEY=VALUE, e.g. objective.name=opd"


# ----------------------------------------------------------------------------- answer_pattern


def test_answer_pattern_empty_is_none():
    assert C.answer_pattern("") is None


@pytest.mark.parametrize(("value", "groups"), [(r"\d+", 0), (r"(\d+)", 1), (r"(?:x)(\d+)(?:y)", 1), (r"#+ (.*)", 1)])
def test_answer_pattern_with_at_most_one_group_is_compiled(value, groups):
    pattern = C.answer_pattern(value)
    assert isinstance(pattern, re.Pattern) and pattern.pattern == value and pattern.groups == groups


@pytest.mark.parametrize(("value", "groups"), [("(a)(b)", 2), ("(a)(b)(c)", 3), ("((x))", 2)])
def test_answer_pattern_with_more_groups_is_refused_naming_the_count(value, groups):
    tail = f"has {groups} groups: expected at most one, the answer (write others as (?:...))"
    assert refusal(C.answer_pattern, value) == f"eval.answer_pattern={value!r} {tail}"
    assert refusal(C.answer_pattern, value, "my.pattern") == f"my.pattern={value!r} {tail}"


@pytest.mark.parametrize("what", [None, "my.pattern"])
def test_answer_pattern_not_a_regex_is_refused_with_the_re_error(what):
    message = refusal(C.answer_pattern, "(", *([what] if what else []))
    name = re.escape(what or "eval.answer_pattern")
    assert re.fullmatch(rf"{name}='\(' is not a regular expression: missing \), unterminated subpattern.*", message)


# ----------------------------------------------------------------------------- _is_fraction / _inside


@pytest.mark.parametrize(("value", "expected"), [(0, True), (0.0, True), (0.5, True), (0.999, True)])
def test_is_fraction_accepts_0_to_just_below_1(value, expected):
    assert C._is_fraction(value) is expected


@pytest.mark.parametrize("value", [1, 1.0, 1.5, -0.001, -1, True, False, "0.5", None, NAN, INF, [0.5]])
def test_is_fraction_refuses_1_negatives_bools_and_non_numbers(value):
    assert C._is_fraction(value) is False


@pytest.mark.parametrize(
    ("child", "parent", "expected"),
    [
        ("/a/b", "/a/b", True),
        ("/a/b/c", "/a/b", True),
        ("/a/b/c/d", "/a/b", True),
        ("/a/bc", "/a/b", False),  # a shared prefix of the name is not inside
        ("/a", "/a/b", False),
        ("/x/b", "/a/b", False),
        ("/", "/a", False),
        ("/a", "/", True),
    ],
)
def test_inside_is_the_folder_itself_or_below_it(child, parent, expected):
    assert C._inside(Path(child), Path(parent)) is expected


# ----------------------------------------------------------------------------- micro_batches_per_rank


@pytest.mark.parametrize(
    ("prompts", "samples", "micro", "world", "expected"),
    [
        (8, 2, 4, 1, 4),  # the defaults
        (8, 2, 4, 2, 2),
        (8, 3, 2, 2, 6),
        (6, 4, 8, 3, 1),
        (12, 1, 1, 4, 3),
        (16, 4, 2, 8, 4),
    ],
)
def test_micro_batches_per_rank_is_prompts_per_rank_times_samples_over_micro_batch(
    prompts, samples, micro, world, expected
):
    cfg = RunConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.student.micro_batch_size = prompts, samples, micro
    out = C.micro_batches_per_rank(cfg, world)
    assert out == expected and type(out) is int


def test_micro_batches_per_rank_ignores_the_teacher_and_rollout_micro_batches():
    cfg = RunConfig()
    cfg.teacher.micro_batch_size, cfg.rollout.micro_batch_size = 1, 3
    assert C.micro_batches_per_rank(cfg, 1) == 4


# ----------------------------------------------------------------------------- check_sampling


def test_check_sampling_accepts_the_defaults():
    assert C.check_sampling(RunConfig()) is None


def test_the_objective_takes_its_temperature_from_the_rollout(tmp_path):
    """One temperature: an objective.temperature key is refused, saying where the setting is."""
    assert load_refusal(tmp_path, {"objective.temperature": 0.7}) == (
        "unknown config key 'objective.temperature': the objective compares log-probs at the temperature that "
        "sampled them, rollout.temperature; set that"
    )
    assert not hasattr(load(tmp_path, {"rollout.temperature": 0.7}).objective, "temperature")


@pytest.mark.parametrize("name", ["tropd", "opd", "eopd", "reopold", "mask_outlier", "clip_outlier", "entropy_opd"])
def test_check_sampling_refuses_top_p_below_1_for_objectives_with_a_log_ratio(name):
    cfg = RunConfig()
    cfg.rollout.top_p, cfg.objective.name = 0.9, name
    assert refusal(C.check_sampling, cfg) == (
        f"rollout.top_p=0.9 with objective.name={name!r}: top-p sampling draws from a truncated distribution, so "
        "the student's log-probs would not be those of the policy that sampled; expected rollout.top_p=1.0 "
        "(top-p is accepted only for fkl_topk, jsd)"
    )


@pytest.mark.parametrize("name", ["fkl_topk", "jsd"])
def test_check_sampling_accepts_top_p_below_1_for_ratio_free_objectives(name):
    cfg = RunConfig()
    cfg.rollout.top_p, cfg.objective.name = 0.9, name
    assert C.check_sampling(cfg) is None


def test_check_sampling_accepts_top_p_of_exactly_1_for_every_objective():
    cfg = RunConfig()
    cfg.rollout.top_p = 1.0
    assert C.check_sampling(cfg) is None


def test_check_sampling_refuses_guidance_longer_than_the_response():
    cfg = RunConfig()
    cfg.rollout.guidance_max_len = 65
    assert refusal(C.check_sampling, cfg) == (
        "rollout.guidance_max_len=65 exceeds rollout.max_new_tokens=64: a teacher prefix counts towards the response "
        "length; expected at most max_new_tokens (0 = max_new_tokens)"
    )


@pytest.mark.parametrize("length", [0, 1, 64])
def test_check_sampling_accepts_guidance_up_to_the_response_length(length):
    cfg = RunConfig()
    cfg.rollout.guidance_max_len = length
    assert C.check_sampling(cfg) is None


# ----------------------------------------------------------------------------- check_outputs / check_outside_models


def test_check_outputs_accepts_three_distinct_folders_outside_the_models(tmp_path):
    cfg = outputs_config(tmp_path)
    cfg.student.path, cfg.teacher.path = str(tmp_path / "student"), str(tmp_path / "teacher")
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    assert C.check_outputs(cfg) is None


@pytest.mark.parametrize(
    ("section", "name", "what"),
    [("checkpoint", "dir", "checkpoints"), ("checkpoint", "export_dir", "exported model"), ("logging", "dir", "logs")],
)
@pytest.mark.parametrize("empty", ["", "  "])
def test_check_outputs_refuses_an_empty_output_folder_naming_what_it_holds(tmp_path, section, name, what, empty):
    cfg = outputs_config(tmp_path)
    setattr(getattr(cfg, section), name, empty)
    assert refusal(C.check_outputs, cfg) == (
        f"{section}.{name} is empty: expected a folder for the run's {what} "
        "(an empty path would write into the current directory)"
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("checkpoint", "dir"), ("checkpoint", "export_dir")),
        (("checkpoint", "dir"), ("logging", "dir")),
        (("checkpoint", "export_dir"), ("logging", "dir")),
    ],
)
def test_check_outputs_refuses_two_outputs_in_the_same_folder(tmp_path, a, b):
    cfg = outputs_config(tmp_path)
    setattr(getattr(cfg, a[0]), a[1], str(tmp_path / "same"))
    setattr(getattr(cfg, b[0]), b[1], str(tmp_path / "x" / ".." / "same"))  # the same folder spelled otherwise
    same = str(real(tmp_path / "same"))
    assert refusal(C.check_outputs, cfg) == (
        f"{'.'.join(a)} and {'.'.join(b)} are the same folder ({same!r}): logs, checkpoints and the exported model "
        "each need their own (their files would mix: both write config.json)"
    )


def test_check_outputs_sees_through_a_symlink_to_the_same_folder(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    cfg = outputs_config(tmp_path)
    cfg.logging.dir = str(tmp_path / "link")
    assert refusal(C.check_outputs, cfg).startswith(
        f"checkpoint.dir and logging.dir are the same folder ({str(real(tmp_path / 'ckpt'))!r})"
    )


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize(("section", "name"), [("checkpoint", "dir"), ("checkpoint", "export_dir"), ("logging", "dir")])
def test_check_outputs_refuses_an_output_that_is_a_model_folder(tmp_path, role, section, name):
    model = tmp_path / role
    model.mkdir()
    cfg = outputs_config(tmp_path)
    getattr(cfg, role).path = str(model)
    setattr(getattr(cfg, section), name, str(model))
    assert refusal(C.check_outputs, cfg) == (
        f"{section}.{name}={str(real(model))!r} is the {role}'s model folder ({role}.path={str(model)!r}): it would "
        "write over the model it reads; expected a folder outside it"
    )


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_check_outputs_refuses_an_output_inside_a_model_folder(tmp_path, role):
    model = tmp_path / role
    model.mkdir()
    cfg = outputs_config(tmp_path)
    getattr(cfg, role).path = str(model)
    cfg.logging.dir = str(model / "runs" / "logs")
    assert refusal(C.check_outputs, cfg) == (
        f"logging.dir={str(real(model) / 'runs' / 'logs')!r} is inside the {role}'s model folder "
        f"({role}.path={str(model)!r}): it would write over the model it reads; expected a folder outside it"
    )


def test_check_outputs_allows_outputs_beside_a_model_folder_with_a_longer_name(tmp_path):
    (tmp_path / "student").mkdir()
    cfg = outputs_config(tmp_path)
    cfg.student.path = str(tmp_path / "student")
    cfg.checkpoint.dir = str(tmp_path / "student_ckpt")
    assert C.check_outputs(cfg) is None


def test_check_outputs_ignores_a_model_path_that_does_not_exist(tmp_path):
    cfg = outputs_config(tmp_path)
    cfg.student.path = str(tmp_path / "ckpt")  # a hub name or a missing folder: nothing there to write over
    assert C.check_outputs(cfg) is None


def test_check_outside_models_names_the_key_and_the_value_as_given(tmp_path):
    model = tmp_path / "student"
    (model / "sub").mkdir(parents=True)
    cfg = RunConfig()
    cfg.student.path = str(model)
    value = str(model / "sub" / "..")
    assert refusal(C.check_outside_models, cfg, "--out", value) == (
        f"--out={value!r} is the student's model folder (student.path={str(model)!r}): it would write over the "
        "model it reads; expected a folder outside it"
    )


def test_check_outside_models_follows_a_symlinked_model_folder(tmp_path):
    (tmp_path / "real_teacher").mkdir()
    (tmp_path / "teacher").symlink_to(tmp_path / "real_teacher")
    cfg = RunConfig()
    cfg.teacher.path = str(tmp_path / "teacher")
    value = str(tmp_path / "real_teacher" / "out")
    assert refusal(C.check_outside_models, cfg, "--out", value).startswith(
        f"--out={value!r} is inside the teacher's model folder (teacher.path={cfg.teacher.path!r})"
    )


def test_check_outside_models_accepts_a_folder_outside_both_models(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    cfg = RunConfig()
    cfg.student.path, cfg.teacher.path = str(tmp_path / "student"), str(tmp_path / "teacher")
    assert C.check_outside_models(cfg, "--out", str(tmp_path / "out")) is None


def test_check_outside_models_with_no_model_paths_accepts_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert C.check_outside_models(RunConfig(), "--out", str(tmp_path / "out")) is None


# ----------------------------------------------------------------------------- load_config: files and paths


def test_load_config_of_an_empty_file_gives_the_defaults_with_outputs_beside_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    (tmp_path / "cfg").mkdir()
    cfg = load_config(str(write(tmp_path / "cfg", text="")))
    base = (tmp_path / "cfg").resolve()
    expected = RunConfig()
    expected.checkpoint.dir = str(base / "runs" / "checkpoints")
    expected.checkpoint.export_dir = str(base / "runs" / "export")
    expected.logging.dir = str(base / "runs" / "logs")
    assert cfg == expected


def test_load_config_without_a_file_resolves_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["optim.steps=3"])
    assert cfg.optim.steps == 3
    assert cfg.logging.dir == str(tmp_path.resolve() / "runs" / "logs")


@pytest.mark.parametrize("name", ["missing.yaml", "folder"])
def test_load_config_of_a_missing_file_or_a_folder_is_refused(tmp_path, name):
    (tmp_path / "folder").mkdir()
    path = tmp_path / name
    what = "does not exist" if name == "missing.yaml" else "is a folder: expected a YAML or JSON run config file"
    assert refusal(load_config, path) == f"config file {str(path)!r} {what}"


def test_load_config_reads_json_by_its_suffix(tmp_path):
    cfg = load_config(write(tmp_path, text='{"optim": {"steps": 7}, "seed": 2}', name="run.json"))
    assert (cfg.optim.steps, cfg.seed) == (7, 2)


def test_load_config_json_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, text='{"optim": {"steps": 3,}}', name="run.json")
    assert re.fullmatch(rf"{re.escape(str(path))}:1:23: JSON syntax error: .+", refusal(load_config, path))


def test_load_config_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, text="seed: 1\noptim: {steps: 3, lr: [1e-3\n")
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+:\d+: YAML syntax error: .+", refusal(load_config, path))
    # the line and column (1-based) of the problem, yaml's problem, and its context when it gives one
    path = write(tmp_path, text="optim:\n  steps: 3\n lr: 1\n")
    assert refusal(load_config, path) == (
        f"{path}:3:2: YAML syntax error: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping)"
    )
    path = write(tmp_path, text="a: b: c\n")
    assert refusal(load_config, path) == f"{path}:1:5: YAML syntax error: mapping values are not allowed here"


def test_load_config_of_an_unreadable_file_names_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"seed: \xff\xfe\n")
    assert refusal(load_config, path).startswith(f"config file {str(path)!r} cannot be read: ")


def test_load_config_of_a_list_is_refused_as_not_a_mapping(tmp_path):
    assert refusal(load_config, write(tmp_path, text="- 1\n")) == "config is a list: expected a mapping of keys"


def test_load_config_of_a_list_with_an_override_is_refused_before_the_override(tmp_path):
    """Kills config.x_load_config__mutmut_22 (if isinstance(data, dict): a list is not refused before the
    overrides, and node["seed"] = 1 on a list raises a TypeError)."""
    assert refusal(load_config, write(tmp_path, text="- 1\n"), ["seed=1"]) == (
        "config is a list: expected a mapping of keys"
    )


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null, a device that is not a regular file")
def test_load_config_of_a_device_is_refused_as_not_a_regular_file():
    """Kills config.x_load_config__mutmut_10 (message None) and 11 (str(None) for the path)."""
    assert refusal(load_config, Path("/dev/null")) == (
        "config file '/dev/null' is not a regular file (a pipe or a device?)"
    )


@pytest.mark.skipif(
    sys.version_info >= (3, 13),
    reason="from Python 3.13 Path.is_dir swallows ENAMETOOLONG and the refusal becomes 'does not exist'",
)
def test_load_config_of_a_name_over_255_bytes_says_the_system_s_reason(tmp_path):
    """Path.is_dir re-raises ENAMETOOLONG (Python 3.11, 3.12): the OSError's strerror is the reason. Kills
    config.x_load_config__mutmut_15 (message None), 16 (str(None) for the path) and 17 (strerror and exc: the
    whole OSError text instead of its reason)."""
    path = tmp_path / ("x" * 300 + ".yaml")
    assert refusal(load_config, path) == f"config file {str(path)!r} cannot be used: File name too long"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "1: 2\n",
            "unknown config key 1 (int) in the top level: expected a name, one of student, teacher, teachers, data, "
            "rollout, objective, optim, checkpoint, logging, eval, seed, collective_timeout_minutes",
        ),
        (
            "logging: {1: 2}\n",
            "unknown config key 1 (int) in logging: expected a name, one of dir, samples_every, progress",
        ),
    ],
    ids=["top-level", "section"],
)
def test_load_config_key_that_is_not_a_string_is_named_with_its_type_and_where(tmp_path, text, message):
    """Kills config.x__build__mutmut_29 (message None), 30 (type(None)), 32 (removesuffix(None)), 37 (join(None))
    and 38 ('XX, XX'.join) in both cases; 31 (removesuffix('.') and ...), 35 ('XXthe top levelXX') and 36
    ('THE TOP LEVEL') at the top level; 33 (removeprefix('.')) and 34 (removesuffix('XX.XX')) in a section."""
    assert refusal(load_config, write(tmp_path, text=text)) == message


def test_load_config_refuses_a_key_given_twice_in_a_yaml_mapping_naming_its_line(tmp_path):
    """Kills config.x__construct_unique_mapping__mutmut_3 (tag != merge: every plain key skipped), 17
    (keys.add(None)), 13 (mark = None: AttributeError), 14 (message None) and 15, 16 (the line - 1, + 2); the
    duplicate after a merge key kills 6 (continue -> break: the keys after it unchecked) and, with the merge
    that loads, 4 and 5 (the merge tag misspelt: the << key is constructed, and has no constructor)."""
    path = write(tmp_path, text="optim:\n  lr: 0.1\n  lr: 0.2\n")
    assert refusal(load_config, path) == (
        f"{path}: line 3: the key 'lr' appears twice in one mapping: the second would silently win"
    )
    path = write(tmp_path, text="student:\n  <<: {dtype: bfloat16}\n  micro_batch_size: 1\n  micro_batch_size: 2\n")
    assert refusal(load_config, path) == (
        f"{path}: line 4: the key 'micro_batch_size' appears twice in one mapping: the second would silently win"
    )
    path = write(tmp_path, text="student:\n  <<: {dtype: bfloat16}\n  micro_batch_size: 1\n")
    cfg = load_config(path)
    assert (cfg.student.dtype, cfg.student.micro_batch_size) == ("bfloat16", 1)


def test_load_config_constructs_yaml_mappings_shallowly(tmp_path):
    """A self-referencing alias: shallow construction (PyYAML's default) builds the recursive list, which the type
    check then refuses. Kills config.x__construct_unique_mapping__mutmut_1 (default deep=True: "found
    unconstructable recursive node", a YAML syntax error)."""
    assert refusal(load_config, write(tmp_path, text="seed: &a [*a]\n")) == "seed=[[...]]: expected int"


def test_load_config_refuses_a_key_given_twice_in_a_json_object(tmp_path):
    """Kills config.x_parse_file__mutmut_7 and 9 (no object_pairs_hook: the last value silently wins) and
    config.x__unique_json_keys__mutmut_3 (message None)."""
    path = write(tmp_path, text='{"seed": 1, "seed": 2}', name="run.json")
    assert refusal(load_config, path) == (
        f"{path}: the key 'seed' appears twice in one object: the second would silently win"
    )


def test_load_config_of_a_section_that_is_not_a_mapping_names_the_section(tmp_path):
    message = refusal(load_config, write(tmp_path, text="optim: 3\n"))
    assert message == "optim is an int: expected a mapping of keys"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim: {stpes: 3}\n", "unknown config key 'optim.stpes'; did you mean 'steps'?"),
        ("sed: 1\n", "unknown config key 'sed'; did you mean 'seed'?"),
        ("rollout: {max_new_token: 3}\n", "unknown config key 'rollout.max_new_token'; did you mean 'max_new_tokens'?"),
        (
            "zzzz: 1\n",
            "unknown config key 'zzzz'; valid keys: student, teacher, teachers, data, rollout, objective, optim, "
            "checkpoint, logging, eval, seed, collective_timeout_minutes",
        ),
        (
            "logging: {qqq: 1}\n",
            "unknown config key 'logging.qqq'; valid keys: dir, samples_every, progress",
        ),
    ],
)
def test_load_config_unknown_key_is_named_with_a_suggestion(tmp_path, text, message):
    assert refusal(load_config, write(tmp_path, text=text)) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim: {steps: fast}\n", "optim.steps='fast': expected int"),
        ("optim: {steps: 2.0}\n", "optim.steps=2.0: expected int"),
        ("optim: {lr: fast}\n", "optim.lr='fast': expected float"),
        ("rollout: {guidance: maybe}\n", "rollout.guidance='maybe': expected bool"),
        ("seed: true\n", "seed=True: expected int"),
        ("student: {lora: [8]}\n", "student.lora=[8]: expected dict"),
        ("optim: {betas: 0.9}\n", "optim.betas=0.9: expected tuple"),
        ("data: {split: 3}\n", "data.split=3: expected str"),
    ],
)
def test_load_config_value_of_the_wrong_type_names_key_value_and_type(tmp_path, text, message):
    assert refusal(load_config, write(tmp_path, text=text)) == message


def test_load_config_reads_yaml_1_1_exponents_as_floats(tmp_path):
    cfg = load_config(write(tmp_path, text="optim: {lr: 3e-3}\nrollout: {guidance: 'False'}\n"))
    assert cfg.optim.lr == 0.003 and cfg.rollout.guidance is False


def test_load_config_resolves_relative_paths_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    (tmp_path / "cfg").mkdir()
    base = (tmp_path / "cfg").resolve()
    flat = {
        "data.path": "rows.jsonl",
        "data.eval_path": "../held/out.jsonl",
        "student.ds_config": "ds.json",
        "teacher.ds_config": "./ds/t.json",
        "checkpoint.dir": "runs/ckpt",  # hub-shaped, but an output folder: always a path
        "checkpoint.export_dir": "out",
        "logging.dir": "./logs",
    }
    cfg = load_config(write(tmp_path / "cfg", flat))
    assert cfg.data.path == str(base / "rows.jsonl")
    assert cfg.data.eval_path == str(base.parent / "held" / "out.jsonl")
    assert cfg.student.ds_config == str(base / "ds.json")
    assert cfg.teacher.ds_config == str(base / "ds" / "t.json")
    assert cfg.checkpoint.dir == str(base / "runs" / "ckpt")
    assert cfg.checkpoint.export_dir == str(base / "out")
    assert cfg.logging.dir == str(base / "logs")


def test_load_config_keeps_hub_ids_of_models_and_data_sets(tmp_path):
    flat = {"student.path": "org/student", "teacher.path": "Qwen/Qwen2.5-0.5B", "data.path": "org/data"}
    cfg = load(tmp_path, {**flat, "data.eval_path": "org/held-out"})
    assert (cfg.student.path, cfg.teacher.path, cfg.data.path, cfg.data.eval_path) == (
        "org/student",
        "Qwen/Qwen2.5-0.5B",
        "org/data",
        "org/held-out",
    )


def test_load_config_resolves_a_hub_shaped_path_that_exists_beside_the_config(tmp_path):
    (tmp_path / "models" / "student").mkdir(parents=True)
    cfg = load(tmp_path, {"student.path": "models/student", "teacher.path": "models/teacher"})
    assert cfg.student.path == str(tmp_path.resolve() / "models" / "student")
    assert cfg.teacher.path == "models/teacher"  # not there: a hub id


def test_load_config_resolves_a_hub_shaped_data_file_name(tmp_path):
    cfg = load(tmp_path, {"data.path": "org/rows.jsonl"})
    assert cfg.data.path == str(tmp_path.resolve() / "org" / "rows.jsonl")


def test_load_config_keeps_an_absolute_path_as_written(tmp_path):
    cfg = load(tmp_path, {"student.path": "/nowhere/../model", "data.eval_path": ""})
    assert cfg.student.path == "/nowhere/../model" and cfg.data.eval_path == ""


def test_load_config_expands_a_path_that_starts_with_a_tilde_to_the_home_folder(tmp_path, monkeypatch):
    """Kills config.x_load_config__mutmut_72 ("XX~XX": the path resolved under the config folder as '~/ckpt'),
    73 (value = None), 74 (expanduser(None)) and 75-80 (the setattr that stores the expanded path, changed)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load(tmp_path, {"checkpoint.dir": "~/ckpt"}).checkpoint.dir == str(tmp_path / "home" / "ckpt")


def test_load_config_accepts_a_path_part_of_255_bytes_and_refuses_one_of_256(tmp_path):
    """Kills config.x_load_config__mutmut_100 (value = None: the check skipped), 111 (>= 255), 112 (> 256) and 114
    (message None)."""
    assert load(tmp_path, {"checkpoint.dir": "x" * 255}).checkpoint.dir == str(tmp_path.resolve() / ("x" * 255))
    assert load_refusal(tmp_path, {"checkpoint.dir": "x" * 256}) == (
        f"checkpoint.dir={str(tmp_path.resolve() / ('x' * 256))!r}: a part of the path is too long (over 255 bytes, "
        "a file name's limit)"
    )


# ----------------------------------------------------------------------------- load_config: overrides


def test_load_config_override_wins_over_the_file(tmp_path):
    cfg = load(tmp_path, {"optim.steps": 3, "seed": 1}, "optim.steps=5")
    assert (cfg.optim.steps, cfg.seed) == (5, 1)


def test_load_config_override_creates_missing_sections_and_keys(tmp_path):
    cfg = load(tmp_path, {}, "objective.options.k=3", "eval.answer_pattern=#### (\\d+)", "data.eval_path=")
    assert cfg.objective.options == {"k": 3}
    assert cfg.eval.answer_pattern == "#### (\\d+)"
    assert cfg.data.eval_path == ""


def test_load_config_override_of_a_section_with_a_mapping_merges_into_it(tmp_path):
    """--set optim={lr: 0.002} sets that key of the file's optim section and keeps the others; --set optim=null
    replaces the section, which is then refused. Kills config.x_load_config__mutmut_43 (... or
    isinstance(node.get(...), dict): {**section, **None}, a TypeError), 45 (len(keys) != 1) and 46 (== 2): the
    section replaced, steps back to 200, 47 (= None: refused), 48 and 49 (keys[1]: IndexError)."""
    path = write(tmp_path, text="optim: {steps: 7}\n")
    cfg = load_config(path, ["optim={lr: 0.002}"])
    assert (cfg.optim.steps, cfg.optim.lr) == (7, 0.002)
    assert refusal(load_config, path, ["optim=null"]) == "optim is a NoneType: expected a mapping of keys"


def test_load_config_override_into_a_value_is_refused_as_not_a_section(tmp_path):
    assert load_refusal(tmp_path, {"seed": 3}, "seed.x=1") == "--set 'seed.x=1': 'seed' is not a section"


def test_load_config_override_of_a_new_section_under_a_value_is_a_type_error(tmp_path):
    assert load_refusal(tmp_path, {}, "optim.steps.x=1") == "optim.steps={'x': 1}: expected int"


def test_load_config_override_without_equals_is_refused(tmp_path):
    assert load_refusal(tmp_path, {}, "optim.steps") == (
        "--set 'optim.steps': expected KEY=VALUE, e.g. objective.name=opd"
    )


# ----------------------------------------------------------------------------- load_config: ranges

# key, the closest refused value, the closest accepted value, what is accepted, other settings the accepted value needs
RANGE_CASES = [
    ("student.micro_batch_size", 0, 1, "a number >= 1", {}),
    ("teacher.micro_batch_size", 0, 1, "a number >= 1", {}),
    ("data.max_prompt_tokens", 0, 1, "a number >= 1", {}),
    ("rollout.prompts_per_step", 0, 1, "a number >= 1", {}),
    ("rollout.samples_per_prompt", 0, 1, "a number >= 1", {}),
    ("rollout.max_new_tokens", 0, 1, "a number >= 1", {}),
    ("rollout.top_p", 0.0, 1e-9, "a number in (0, 1]", {"objective.name": "jsd"}),
    ("rollout.top_p", 1.000001, 1.0, "a number in (0, 1]", {}),
    ("rollout.guidance_max_len", -1, 0, "a number >= 0", {}),
    ("rollout.micro_batch_size", -1, 0, "a number >= 0", {}),
    ("optim.steps", 0, 1, "a number >= 1", {}),
    ("optim.lr", 0.0, 1e-12, "a number > 0", {}),
    ("optim.lr", -1.0, 1e-12, "a number > 0", {}),
    ("optim.warmup_steps", -1, 0, "a number >= 0", {}),
    ("optim.min_lr_ratio", -0.001, 0.0, "a number in [0, 1]", {}),
    ("optim.min_lr_ratio", 1.001, 1.0, "a number in [0, 1]", {}),
    ("optim.weight_decay", -0.001, 0.0, "a number >= 0", {}),
    ("optim.grad_clip", -0.001, 0.0, "a number >= 0", {}),
    ("optim.max_bad_steps", 0, 1, "a number >= 1", {}),
    ("checkpoint.every", -1, 0, "a number >= 0", {}),
    ("checkpoint.keep_last", -1, 0, "a number >= 0", {}),
    ("checkpoint.stop_after", -1, 0, "a number >= 0", {}),
    ("logging.samples_every", -1, 0, "a number >= 0", {}),
    ("eval.every", -1, 0, "a number >= 0", {}),
    ("eval.max_prompts", 0, 1, "a number >= 1", {}),
    ("eval.samples", 0, 1, "a number >= 1", {}),
    ("eval.max_new_tokens", 0, 1, "a number >= 1", {}),
    ("eval.temperature", -0.001, 0.0, "a number >= 0", {}),
]


@pytest.mark.parametrize(("key", "bad", "good", "accepted", "extra"), RANGE_CASES)
def test_load_config_refuses_a_value_just_outside_its_range_naming_what_is_accepted(
    tmp_path, key, bad, good, accepted, extra
):
    assert load_refusal(tmp_path, {**extra, key: bad}) == f"{key}={bad!r}: expected {accepted}"


@pytest.mark.parametrize(("key", "bad", "good", "accepted", "extra"), RANGE_CASES)
def test_load_config_accepts_the_value_at_the_edge_of_its_range(tmp_path, key, bad, good, accepted, extra):
    section, name = key.split(".")
    assert getattr(getattr(load(tmp_path, {**extra, key: good}), section), name) == good


def test_load_config_refuses_rollout_temperature_0_explaining_greedy_decoding(tmp_path):
    assert load_refusal(tmp_path, {"rollout.temperature": 0.0}) == (
        "rollout.temperature=0.0: expected a number > 0 (0 is greedy decoding, which on-policy sampling cannot use)"
    )


def test_load_config_accepts_a_tiny_rollout_temperature(tmp_path):
    cfg = load(tmp_path, {"rollout.temperature": 1e-9})
    assert cfg.rollout.temperature == 1e-9


@pytest.mark.parametrize("key", ["optim.lr", "rollout.top_p", "optim.weight_decay", "eval.temperature"])
@pytest.mark.parametrize("value", [INF, -INF, NAN])
def test_load_config_refuses_a_non_finite_number(tmp_path, key, value):
    accepted = dict((k, a) for k, _, _, a, _ in RANGE_CASES)[key]
    assert load_refusal(tmp_path, {key: value}) == f"{key}={value!r}: expected {accepted}"


def test_load_config_refuses_nan_written_as_a_string(tmp_path):
    assert load_refusal(tmp_path, {}, "optim.grad_clip=nan") == "optim.grad_clip=nan: expected a number >= 0"


def test_an_open_upper_bound_refuses_the_bound_itself(tmp_path, monkeypatch):
    monkeypatch.setitem(C.RANGES, ("optim", "weight_decay"), (0, True, 1, False))
    assert load_refusal(tmp_path, {"optim.weight_decay": 1.0}) == "optim.weight_decay=1.0: expected a number in [0, 1)"
    assert load(tmp_path, {"optim.weight_decay": 0.999}).optim.weight_decay == 0.999


def test_a_closed_upper_bound_accepts_the_bound_and_refuses_above(tmp_path, monkeypatch):
    monkeypatch.setitem(C.RANGES, ("optim", "weight_decay"), (0, False, 2, True))
    assert load(tmp_path, {"optim.weight_decay": 2.0}).optim.weight_decay == 2.0
    assert load_refusal(tmp_path, {"optim.weight_decay": 2.5}) == "optim.weight_decay=2.5: expected a number in (0, 2]"
    assert load_refusal(tmp_path, {"optim.weight_decay": 0.0}) == "optim.weight_decay=0.0: expected a number in (0, 2]"


# ----------------------------------------------------------------------------- load_config: choices and columns

CHOICE_CASES = {
    "data.long_prompts": ("truncate", "skip"),
    "eval.answer_check": ("auto", "exact", "math_verify"),
    "optim.schedule": (
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
    ),
    "rollout.prefix_source": ("data", "teacher"),
    "student.dtype": ("float32", "bfloat16", "float16"),
    "teacher.dtype": ("float32", "bfloat16", "float16"),
}


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, values in CHOICE_CASES.items() for v in values])
def test_load_config_accepts_each_listed_choice(tmp_path, key, value):
    section, name = key.split(".")
    assert getattr(getattr(load(tmp_path, {key: value}), section), name) == value


@pytest.mark.parametrize("key", list(CHOICE_CASES))
@pytest.mark.parametrize("value", ["nope", "", "Linear"])
def test_load_config_refuses_an_unlisted_choice_listing_the_accepted_ones(tmp_path, key, value):
    assert load_refusal(tmp_path, {key: value}) == f"{key}={value!r}: expected one of {', '.join(CHOICE_CASES[key])}"


def test_load_config_refuses_schedules_that_need_a_metric(tmp_path):
    assert load_refusal(tmp_path, {"optim.schedule": "reduce_lr_on_plateau"}).startswith(
        "optim.schedule='reduce_lr_on_plateau': expected one of cosine_with_min_lr, "
    )


@pytest.mark.parametrize("key", ["prompt_column", "answer_column", "teacher_response_column", "messages_column"])
@pytest.mark.parametrize("value", ["", "   "])
def test_load_config_refuses_an_empty_column_name(tmp_path, key, value):
    assert load_refusal(tmp_path, {f"data.{key}": value}) == (
        f"data.{key} is empty: expected the name of a column of the data set"
    )


# ----------------------------------------------------------------------------- load_config: seeds, time-out, optim


@pytest.mark.parametrize("key", ["seed", "data.shuffle_seed"])
@pytest.mark.parametrize("value", [-1, 2**32, 2**40])
def test_load_config_refuses_a_seed_outside_32_bits(tmp_path, key, value):
    assert load_refusal(tmp_path, {key: value}) == f"{key}={value}: expected an integer in [0, 2**32)"


@pytest.mark.parametrize("key", ["seed", "data.shuffle_seed"])
@pytest.mark.parametrize("value", [0, 2**32 - 1])
def test_load_config_accepts_a_seed_from_0_to_2_to_the_32_minus_1(tmp_path, key, value):
    cfg = load(tmp_path, {key: value})
    assert (cfg.seed if key == "seed" else cfg.data.shuffle_seed) == value


@pytest.mark.parametrize("value", [0.0, -1.0, 10080.001, 10081.0, INF, NAN])
def test_load_config_refuses_a_collective_timeout_outside_0_to_a_week(tmp_path, value):
    assert load_refusal(tmp_path, {"collective_timeout_minutes": value}) == (
        f"collective_timeout_minutes={value!r}: expected a number of minutes > 0 and at most 10080 (a week), "
        "e.g. 240 for answers of 8k tokens"
    )


@pytest.mark.parametrize("value", [1e-9, 1.0, 240.0, 10080.0])
def test_load_config_accepts_a_collective_timeout_up_to_a_week(tmp_path, value):
    assert load(tmp_path, {"collective_timeout_minutes": value}).collective_timeout_minutes == value


def test_load_config_collective_timeout_defaults_to_240_minutes(tmp_path):
    assert load(tmp_path).collective_timeout_minutes == 240.0


@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine", "warmup_stable_decay"])
def test_load_config_refuses_min_lr_ratio_with_a_schedule_that_ignores_it(tmp_path, schedule):
    assert load_refusal(tmp_path, {"optim.min_lr_ratio": 0.1, "optim.schedule": schedule}) == (
        f"optim.min_lr_ratio=0.1 with optim.schedule={schedule!r}: the ratio applies to cosine_with_min_lr and "
        "cosine_warmup_with_min_lr; remove it or pass the schedule's own arguments in optim.schedule_kwargs"
    )


@pytest.mark.parametrize("schedule", ["cosine_with_min_lr", "cosine_warmup_with_min_lr"])
def test_load_config_accepts_min_lr_ratio_with_the_min_lr_schedules(tmp_path, schedule):
    cfg = load(tmp_path, {"optim.min_lr_ratio": 0.1, "optim.schedule": schedule})
    assert cfg.optim.min_lr_ratio == 0.1


def test_load_config_accepts_the_default_min_lr_ratio_with_any_schedule(tmp_path):
    assert load(tmp_path, {"optim.schedule": "linear"}).optim.min_lr_ratio == 1.0


@pytest.mark.parametrize(
    "betas", [[0.9], [], [0.9, 0.99, 0.999], [0.9, 1.0], [1, 0.9], [-0.1, 0.9], [0.9, True], [0.9, "0.99"]]
)
def test_load_config_refuses_betas_other_than_two_fractions(tmp_path, betas):
    assert load_refusal(tmp_path, {"optim.betas": betas}) == f"optim.betas={betas!r}: expected two numbers in [0, 1)"


@pytest.mark.parametrize("betas", [[0, 0], [0.9, 0.999], [0.5, 0.999999]])
def test_load_config_accepts_two_betas_in_0_to_1(tmp_path, betas):
    assert load(tmp_path, {"optim.betas": betas}).optim.betas == tuple(betas)


def test_load_config_refuses_several_greedy_eval_samples(tmp_path):
    assert load_refusal(tmp_path, {"eval.samples": 2, "eval.temperature": 0.0}) == (
        "eval.samples=2 with eval.temperature=0: greedy decoding gives 2 identical completions; set "
        "eval.temperature > 0 for avg@n, or eval.samples=1"
    )


@pytest.mark.parametrize(("samples", "temperature"), [(1, 0.0), (2, 0.5), (1, 0.5)])
def test_load_config_accepts_one_greedy_sample_or_several_sampled_ones(tmp_path, samples, temperature):
    cfg = load(tmp_path, {"eval.samples": samples, "eval.temperature": temperature})
    assert (cfg.eval.samples, cfg.eval.temperature) == (samples, temperature)


# ----------------------------------------------------------------------------- load_config: the other checks it runs


def test_load_config_refuses_an_answer_pattern_with_two_groups(tmp_path):
    assert load_refusal(tmp_path, {"eval.answer_pattern": "(a)(b)"}) == (
        "eval.answer_pattern='(a)(b)' has 2 groups: expected at most one, the answer (write others as (?:...))"
    )


def test_load_config_refuses_outputs_in_the_same_folder(tmp_path):
    assert load_refusal(tmp_path, {"logging.dir": "out", "checkpoint.export_dir": "out"}) == (
        f"checkpoint.export_dir and logging.dir are the same folder ({str(tmp_path.resolve() / 'out')!r}): logs, "
        "checkpoints and the exported model each need their own (their files would mix: both write config.json)"
    )


def test_load_config_refuses_an_output_inside_the_student_folder(tmp_path):
    (tmp_path / "student").mkdir()
    message = load_refusal(tmp_path, {"student.path": "student", "checkpoint.dir": "student/ckpt"})
    assert message.startswith(f"checkpoint.dir={str(real(tmp_path) / 'student' / 'ckpt')!r} is inside the student's")


def test_load_config_refuses_gathering_the_student_as_a_key_of_the_other_side(tmp_path):
    assert load_refusal(tmp_path, {"student.gather_params": True}) == (
        "unknown config key 'student.gather_params': gathering for the teacher's scoring is teacher.gather_params; "
        "the student's generation is rollout.gather_params"
    )


def test_load_config_accepts_gathering_the_teacher(tmp_path):
    assert load(tmp_path, {"teacher.gather_params": True}).teacher.gather_params is True


def test_gather_params_default_to_auto_and_accept_true_false_or_auto(tmp_path):
    cfg = load(tmp_path, {})
    assert cfg.teacher.gather_params == "auto" and cfg.rollout.gather_params == "auto"
    assert load(tmp_path, {"rollout.gather_params": "false"}).rollout.gather_params is False  # --set's text
    assert load(tmp_path, {"teacher.gather_params": "True"}).teacher.gather_params is True
    for where in ("teacher", "rollout"):  # rollout's: kills config.x_load_config__mutmut_241, 242 (its name)
        for value in ("sometimes", 1, 0.5):
            assert load_refusal(tmp_path, {f"{where}.gather_params": value}) == (
                f"{where}.gather_params={value!r}: expected true, false or auto"
            )


def test_the_gather_rule_and_the_runs_decision_on_a_module():
    """gather_params auto: the whole model gathered when its weights take at most half of the free memory, on
    every rank alike (here one process, a plain module: its full size)."""
    import torch

    from tropd_ds.config import gather_fits
    from tropd_ds.process import gather_decision

    assert gather_fits(50, 100) and not gather_fits(51, 100)
    module = torch.nn.Linear(1000, 1000)  # 4 MB of fp32 weights

    class Engine:
        pass

    engine = Engine()
    engine.module = module
    fits, why = gather_decision(engine, torch.device("cpu"))
    assert fits and why.startswith("the model's 0.00 GiB against ") and why.endswith(": gathered whole, hook-free")


def test_load_config_refuses_lora_on_the_teacher(tmp_path):
    assert load_refusal(tmp_path, {"teacher.lora": {"r": 4}}) == (
        "unknown config key 'teacher.lora': the teacher is frozen; LoRA applies to the student only (student.lora)"
    )


def test_load_config_checks_the_students_lora(tmp_path):
    assert load_refusal(tmp_path, {"student.lora": {"r": 0}}) == "student.lora.r=0: expected an integer >= 1"
    assert load_refusal(tmp_path, {"student.lora": {"rank": 4}}) == (
        "student.lora has unknown keys ['rank']: accepted r, alpha, dropout, target_modules"
    )


def test_load_config_keeps_the_students_lora_as_written(tmp_path):
    assert load(tmp_path, {"student.lora": {"r": 4}}).student.lora == {"r": 4}


def test_load_config_refuses_gradient_checkpointing_on_the_teacher(tmp_path):
    assert load_refusal(tmp_path, {"teacher.gradient_checkpointing": True}) == (
        "unknown config key 'teacher.gradient_checkpointing': the teacher is frozen and has no backward; it applies "
        "to the student only (student.gradient_checkpointing)"
    )


def test_load_config_accepts_gradient_checkpointing_on_the_student(tmp_path):
    assert load(tmp_path, {"student.gradient_checkpointing": True}).student.gradient_checkpointing is True


# ----------------------------------------------------------------------------- read_ds_config / to_dict


def test_read_ds_config_returns_the_json_object(tmp_path):
    path = write(tmp_path, text='{"train_batch_size": 8}', name="ds.json")
    assert C.read_ds_config(str(path)) == {"train_batch_size": 8}


def test_read_ds_config_refuses_invalid_json_naming_the_file(tmp_path):
    path = write(tmp_path, text="{oops", name="ds.json")
    assert refusal(C.read_ds_config, str(path)).startswith(f"DeepSpeed config {str(path)!r} is not valid JSON: ")


def test_read_ds_config_refuses_json_that_is_not_an_object(tmp_path):
    path = write(tmp_path, text="[1, 2]", name="ds.json")
    message = refusal(C.read_ds_config, str(path))
    assert message == f"DeepSpeed config {str(path)!r} holds a list: expected a JSON object"


def test_to_dict_nests_every_section():
    out = C.to_dict(RunConfig())
    assert out["optim"]["steps"] == 200 and out["rollout"]["top_p"] == 1.0 and out["seed"] == 0


def test_config_list_states_each_top_level_fields_own_range(tmp_path):
    """`tropd-ds config --list` says what each top-level field accepts, and the edges it names are the checks'."""
    accepted = {f["key"]: f["accepted"] for f in C.describe_fields()}
    assert accepted["seed"] == "an integer in [0, 2**32)"
    assert accepted["collective_timeout_minutes"] == "a number > 0, at most 10080 (a week)"
    assert load(tmp_path, {"collective_timeout_minutes": 10080}).collective_timeout_minutes == 10080
    assert load_refusal(tmp_path, {"collective_timeout_minutes": 10080.5}).startswith(
        "collective_timeout_minutes=10080.5: expected a number of minutes > 0 and at most 10080 (a week)"
    )


# a served teacher (teacher.url)


def served(**teacher) -> RunConfig:
    cfg = RunConfig()
    for key, value in teacher.items():
        setattr(cfg.teacher, key, value)
    return cfg


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ({"url": "teacher:8471"}, "teacher.url='teacher:8471': expected http://host:port"),
        (
            {"url": "http://a:1", "path": "/m"},
            "teacher.url='http://a:1' with teacher.path set: a run uses a served teacher (url) or one in this job "
            "(path and ds_config), not both; remove one",
        ),
        ({"token_file": "/t"}, "teacher.token_file='/t' without teacher.url: the secret is for a served teacher"),
    ],
)
def test_teacher_url_refusals(teacher, message):
    with pytest.raises(ConfigError) as info:
        C.check_served_teacher(served(**teacher))
    assert str(info.value).startswith(message)
    if "path" in teacher:  # the whole refusal (kills config.check_served_teacher 20, 21)
        assert str(info.value) == message


def test_a_served_teacher_does_not_generate_prefixes():
    cfg = served(url="http://10.0.0.5:8471")
    C.check_served_teacher(cfg)
    cfg.rollout.prefix_source = "teacher"
    with pytest.raises(ConfigError) as info:
        C.check_served_teacher(cfg)
    assert str(info.value) == (
        "rollout.prefix_source='teacher' with teacher.url='http://10.0.0.5:8471': a served teacher scores, it does "
        "not generate prefixes; use rollout.prefix_source=data (a teacher_response column)"
    )  # whole (kills config.check_served_teacher 27, 28)
    for url in ("http://[::1]:8471", "https://teacher.example:443/", "http://teacher"):
        C.check_served_teacher(served(url=url))


def test_load_config_applies_the_served_teacher_rules_and_resolves_the_secrets_path(tmp_path):
    cfg = load(tmp_path, {"teacher.path": "", "teacher.ds_config": "", "teacher.url": "http://10.0.0.5:8471",
                          "teacher.token_file": "secret"})  # fmt: skip
    assert cfg.teacher.token_file == str(tmp_path.resolve() / "secret") and cfg.teacher.wait_minutes == 30.0
    local = {"teacher.path": "teacher", "teacher.ds_config": "ds.json"}
    assert load_refusal(tmp_path, {"teacher.url": "http://10.0.0.5:8471", **local}).startswith(
        "teacher.url='http://10.0.0.5:8471' with teacher.path and teacher.ds_config set: a run uses a served teacher"
    )
    assert load_refusal(tmp_path, {"teacher.wait_minutes": 0}) == "teacher.wait_minutes=0.0: expected a number > 0"
