"""Data as users have it (configurable columns, conversations, chat-template keywords) and evaluation users
trust (math-verify answer checks, avg@n with its standard error, per-prompt records, dtype and device)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import ROOT, launch, records, write_config

from tropd_ds.config import ConfigError, load_config
from tropd_ds.data import Columns, check_rows, check_template_kwargs, load_rows, render_prompt
from tropd_ds.evaluation import avg_at_n, is_correct, resolve_checker

CLI = str(Path(sys.executable).with_name("tropd-ds"))
# Reads enable_thinking: "+0" before the "=" of the generation prompt (the sum is unchanged, the text is not).
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{% if enable_thinking %}+0{% endif %}={% endif %}"
)


def git_head() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_template(workspace: Path, tmp: Path, role: str) -> Path:
    from transformers import AutoTokenizer

    out = tmp / role
    shutil.copytree(workspace / role, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(out)
    return out


def test_configured_columns_are_read_under_the_canonical_names(tmp_path):
    path = write_rows(
        tmp_path / "rows.jsonl",
        [{"question": "1+2=", "solution": 3, "worked": "1+2=3;#3", "prompt": "not this one", "id": 7}],
    )
    ds = load_rows(str(path), columns=Columns(prompt="question", answer="solution", teacher_response="worked"))
    row = ds[0]
    assert (row["prompt"], row["answer"], row["teacher_response"], row["id"]) == ("1+2=", 3, "1+2=3;#3", 7)
    assert "question" not in ds.column_names and "solution" not in ds.column_names
    # two configured columns that carry each other's canonical names
    swapped = load_rows(str(write_rows(tmp_path / "s.jsonl", [{"prompt": "9", "answer": "4+5="}])),
                        columns=Columns(prompt="answer", answer="prompt"))  # fmt: skip
    assert (swapped[0]["prompt"], swapped[0]["answer"]) == ("4+5=", "9")


def test_conversations_give_the_prompt_turns_and_the_last_assistant_turn_as_teacher_response(tmp_path):
    chat = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "1+2=3;#3"},
    ]
    open_chat = [{"role": "user", "content": "4+4"}]
    ds = load_rows(str(write_rows(tmp_path / "c.jsonl", [{"chat": chat, "answer": "3"}, {"chat": open_chat}])),
                   columns=Columns(messages="chat"))  # fmt: skip
    assert ds[0]["prompt"] == chat[:2] and ds[0]["teacher_response"] == "1+2=3;#3" and ds[0]["answer"] == "3"
    assert ds[1]["prompt"] == open_chat and ds[1]["teacher_response"] is None
    # a teacher_response column of the data's own wins over the conversation's last turn
    own = load_rows(str(write_rows(tmp_path / "o.jsonl", [{"messages": chat, "teacher_response": "x"}])))
    assert own[0]["prompt"] == chat[:2] and own[0]["teacher_response"] == "x"


@pytest.mark.parametrize(
    "rows, columns, words",
    [
        ([{"q": "1+2="}], Columns(prompt="question"), ["has columns ['q']", "'question' (data.prompt_column)",
                                                       "'messages' (data.messages_column)"]),
        ([{"messages": [{"role": "assistant", "content": "3"}]}], Columns(), ["row 0", "lone assistant turn"]),
        ([{"messages": [{"role": "user", "content": "1"}]}, {"messages": [{"role": "user"}]}], Columns(),
         ["row 1", "is not a chat message", "'content': str"]),
        ([{"messages": "1+2="}], Columns(), ["row 0", "expected a non-empty list"]),
    ],
)  # fmt: skip
def test_a_missing_column_or_a_malformed_conversation_is_named(tmp_path, rows, columns, words):
    with pytest.raises(ConfigError) as err:
        load_rows(str(write_rows(tmp_path / "bad.jsonl", rows)), columns=columns)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_column_of_the_wrong_type_is_named_with_the_data_sets_own_name(workspace, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "student")
    columns = Columns(answer="solution")
    ds = load_rows(str(write_rows(tmp_path / "r.jsonl", [{"prompt": "1+2=", "solution": [3]}])), columns=columns)
    with pytest.raises(ConfigError, match=r"row 0: solution=\[3\] \(list\): expected a string or a number"):
        check_rows(ds, tok, "data.eval_path", 16, "truncate", False, True, columns=columns)


def test_chat_template_keywords_reach_the_template_and_ignored_ones_are_warned(workspace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "student")
    tok.chat_template = THINKING_TEMPLATE
    assert render_prompt(tok, "1+2", True) == "1+2="
    assert render_prompt(tok, "1+2", True, {"enable_thinking": True}) == "1+2+0="
    assert check_template_kwargs(tok, {"enable_thinking": False}) == []
    [warning] = check_template_kwargs(tok, {"enable_thinking": True, "thinking_budget": 3})
    assert "never reads 'thinking_budget'" in warning and "enable_thinking" in warning
    with pytest.raises(ConfigError, match="sets 'tokenize'"):
        check_template_kwargs(tok, {"tokenize": True})
    tok.chat_template = None
    [warning] = check_template_kwargs(tok, {"enable_thinking": True})
    assert "no chat template" in warning


def test_answers_are_checked_exactly_then_by_math_verify():
    assert resolve_checker("auto") == "math_verify"  # the eval extra is installed for the tests
    assert is_correct("8+1=9;#9", "9", "exact") and is_correct("8+1=9;#9", "9", "math_verify")
    assert not is_correct(r"so \boxed{1/2}", "0.5", "exact")
    assert is_correct(r"so \boxed{1/2}", "0.5", "math_verify")
    assert is_correct(r"the answer is \frac{3}{4}", "0.75", "math_verify")
    assert is_correct(r"\boxed{2x+2}", "2(x+1)", "math_verify") and not is_correct("#2", "2(x+1)", "math_verify")
    assert is_correct(r"the side is \boxed{5\text{ cm}}", "5", "math_verify")
    assert not is_correct("4+4=8;#8", "9", "math_verify") and not is_correct("no answer", "9", "math_verify")


def test_an_answer_pattern_scores_only_marked_answers():
    """Without a pattern a completion with no marker is scored by its last number (`3+3+3+` reads as 3); with
    `eval.answer_pattern` it is wrong, and math-verify sees the marked answer alone."""
    from tropd_ds.config import answer_pattern

    hash_n = answer_pattern(r"#\s*(-?[0-9]+)")
    assert is_correct("3+3+3+", "3", "math_verify") and not is_correct("3+3+3+", "3", "math_verify", hash_n)
    assert is_correct("8-5=3;#3", "3", "exact", hash_n) and is_correct("9-9=-1;#-1", "-1", "exact", hash_n)
    assert not is_correct("8-5=3;#5", "3", "math_verify", hash_n)  # the last '#N' is the answer, not a 3 before it
    final = answer_pattern(r"Final answer: (\S+)")
    assert is_correct("so x = 1/2. Final answer: 1/2", "0.5", "math_verify", final)
    assert not is_correct("so x = 1/2", "0.5", "math_verify", final)
    assert is_correct("the total: 42", "42", "exact", answer_pattern("[0-9]+"))  # no group: the whole match
    assert answer_pattern("") is None
    # on the command line a value that starts with '#' is the value, not a YAML comment
    cfg = load_config(ROOT / "configs/demo.yaml", [r"eval.answer_pattern=#\s*([0-9]+)", "data.eval_path="])
    assert cfg.eval.answer_pattern == r"#\s*([0-9]+)" and cfg.data.eval_path == ""
    with pytest.raises(ConfigError, match=r"eval.answer_pattern='\(' is not a regular expression"):
        answer_pattern("(")
    with pytest.raises(ConfigError, match=r"has 2 groups: expected at most one"):
        answer_pattern("(a)(b)")


def test_a_missing_eval_extra_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name))
    assert resolve_checker("auto") == "exact"
    with pytest.raises(ConfigError, match=r"pip install 'tropd-ds\[eval\]'"):
        resolve_checker("math_verify")


def test_avg_at_n_and_its_standard_error():
    mean, stderr = avg_at_n([1.0, 0.5, 0.0, 0.5])
    assert mean == 0.5 and math.isclose(stderr, math.sqrt((0.25 + 0 + 0.25 + 0) / 3 / 4))
    assert math.isnan(avg_at_n([1.0])[1])


def test_a_run_on_conversations_with_renamed_eval_columns_and_template_keywords(workspace, tmp_path):
    """2 CPU ranks: conversation training data, held-out rows under other column names, the template's
    enable_thinking; then `tropd-ds eval` on the export with the same keywords, avg@2 and records."""
    student, teacher = with_template(workspace, tmp_path, "student"), with_template(workspace, tmp_path, "teacher")
    train = [json.loads(x) for x in (workspace / "data/train.jsonl").read_text().splitlines()][:64]
    chats = [{"messages": [{"role": "user", "content": r["prompt"].rstrip("=")},
                           {"role": "assistant", "content": r["teacher_response"]}]} for r in train]  # fmt: skip
    held = [json.loads(x) for x in (workspace / "data/eval.jsonl").read_text().splitlines()][:6]
    eval_rows = [{"question": r["prompt"].rstrip("="), "solution": r["answer"]} for r in held]
    data = {
        "path": str(write_rows(tmp_path / "chats.jsonl", chats)),
        "eval_path": str(write_rows(tmp_path / "held.jsonl", eval_rows)),
        "max_prompt_tokens": 32,
        "chat_template": True,
        "chat_template_kwargs": {"enable_thinking": True},
        "prompt_column": "question",
        "answer_column": "solution",
    }
    ds_config = json.loads((ROOT / "ds_configs/cpu_student_zero3.json").read_text())
    ds_config["tensorboard"] = {"enabled": True, "output_path": "tb", "job_name": "chats"}
    (tmp_path / "student_ds.json").write_text(json.dumps(ds_config))
    config = write_config(
        tmp_path,
        "chats",
        data=data,
        student={"ds_config": str(tmp_path / "student_ds.json")},
        optim={"steps": 2, "lr": 1e-3},
        eval={"max_prompts": 6, "max_new_tokens": 12},
        checkpoint={"every": 0},
        logging={"samples_every": 1, "progress": False},
    )
    assert str(student) in config.read_text() and str(teacher) in config.read_text()  # the templated copies
    launch(config)
    rs = records(tmp_path / "chats")
    samples = [r["sample"] for r in rs if "sample" in r]
    assert samples and all("+0=" in s for s in samples), samples  # the template rendered with enable_thinking
    # the first step carries the resolved config and the code's commit; TensorBoard has them and the scalars
    first = [r for r in rs if "loss" in r][0]
    assert first["run_config"]["data"]["chat_template_kwargs"] == {"enable_thinking": True}
    assert first["git_commit"] == git_head() and "deepspeed" in first["versions"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = {p.parent for p in (tmp_path / "chats/logs/tb").rglob("events.out.tfevents.*")}
    tb = EventAccumulator(str(events)).Reload()
    assert "tropd/loss" in tb.Tags()["scalars"] and "tropd/run/text_summary" in tb.Tags()["tensors"]
    evals = [r for r in rs if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(math.isfinite(r["eval_accuracy_stderr"]) for r in evals)
    per_prompt = [json.loads(x) for f in sorted((tmp_path / "chats/logs/eval").glob("step2-rank*.jsonl"))
                  for x in f.read_text().splitlines()]  # fmt: skip
    assert sorted(r["index"] for r in per_prompt) == list(range(6))
    assert all(len(r["completions"]) == len(r["correct"]) == 1 for r in per_prompt)
    assert sum(r["correct"][0] for r in per_prompt) / 6 == pytest.approx(evals[-1]["eval_accuracy"])

    out = tmp_path / "eval.jsonl"
    proc = subprocess.run(
        [CLI, "eval", str(tmp_path / "chats/export"), "--data", data["eval_path"], "--prompt-column", "question",
         "--answer-column", "solution", "--chat-template-kwargs", '{"enable_thinking": true, "budget": 1}',
         "--samples", "2", "--temperature", "1.0", "--max-new-tokens", "12", "--records", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "never reads 'budget'" in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval_completions"] == 12 and result["eval_prompts"] == 6 and result["samples"] == 2
    assert result["answer_check"] == "math_verify" and math.isfinite(result["eval_accuracy_stderr"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(6)) and all(len(r["completions"]) == 2 for r in lines)
    assert [r["prompt"] for r in lines] == [r["question"] for r in eval_rows]


def test_eval_loads_the_model_in_its_saved_dtype_and_refuses_bad_arguments(workspace, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tropd_ds import cli

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(workspace / "student").to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(workspace / "student").save_pretrained(folder)
    data = str(workspace / "data/eval.jsonl")
    chats = write_rows(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "1+2"}], "answer": "3"}])
    base = [CLI, "eval", str(folder), "--data", data, "--max-prompts", "4", "--max-new-tokens", "6"]
    for extra, dtype in (([], "bfloat16"), (["--dtype", "float32"], "float32")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["dtype"] == dtype and result["device"] == "cpu" and result["eval_prompts"] == 4
    for extra, words in (
        (["--samples", "3"], "greedy decoding gives 3 identical completions"),
        (["--chat-template-kwargs", "[1]"], "expected a JSON object"),
        (["--device", "tpu"], "--device='tpu': expected auto, cpu, cuda or cuda:N"),
        (["--answer-column", "solution"], "an answer column 'solution' (--answer-column) is required"),
        (["--data", str(chats)], "prompt is a list of chat messages but the tokenizer has no chat template"),
        (["--answer-pattern", "#(("], "--answer-pattern='#((' is not a regular expression"),
    ):
        code = cli.main(base[1:] + extra)
        err = capsys.readouterr().err
        assert code == 2 and words in err, err[-2000:]


def test_eval_refuses_an_interrupted_export_and_warns_of_a_pattern_that_matches_nothing(workspace, tmp_path, capsys):
    """An export whose marker says it was interrupted is refused by its marker (it used to go on to a tokenizer
    traceback); an answer pattern that matches no completion is warned about with a completion to compare."""
    from tropd_ds import cli

    folder = tmp_path / "export"
    shutil.copytree(workspace / "student", folder)
    data = str(workspace / "data/eval.jsonl")
    base = ["eval", str(folder), "--data", data, "--max-prompts", "3", "--max-new-tokens", "6"]
    (folder / "tropd_export.json").write_text('{"exported_from": "the end of training", "complete": false}')
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "is an interrupted tropd-ds export" in err and "Export again" in err and "Traceback" not in err, err
    (folder / "tropd_export.json").write_text('{"exported_from": "the end of training", "complete": true}')
    assert cli.main(base + ["--answer-pattern", "ANSWER: ([0-9]+)"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["eval_accuracy"] == 0.0
    assert "the answer pattern 'ANSWER: ([0-9]+)' matched none of the 3 completions" in err, err
    assert "a completion reads '" in err
    assert cli.main(base + ["--answer-pattern", "(.*)"]) == 0  # matches every completion
    assert "matched none" not in capsys.readouterr().err
    from tropd_ds.evaluation import unmatched_pattern_warning  # the same words in a run's held-out evaluation

    assert unmatched_pattern_warning("x=(\\d)", 0, 4, "no\nanswer") == (
        "warning: the answer pattern 'x=(\\\\d)' matched none of the 4 completions, so each was scored wrong; a "
        "completion reads 'no\\nanswer'. Check the pattern against the model's answer format"
    )
    assert unmatched_pattern_warning("x=(\\d)", 1, 4, "x=1") is None and unmatched_pattern_warning("", 0, 4, "") is None


def test_held_out_means_held_out_splits_are_chosen_explicitly_and_shared_prompts_warned(workspace, tmp_path, capsys):
    """A folder with train.jsonl and test.jsonl as the evaluation set used to be read with data.split = train:
    held-out accuracy measured on training rows. Now data with several splits needs data.eval_split (or
    `tropd-ds eval --split`), the evaluation split is chosen apart from the training one (a DatasetDict's
    train_sft with a file evaluation set), and prompts shared by both sets are counted and warned about."""
    import datasets

    from tropd_ds import cli
    from tropd_ds.data import load_rows
    from tropd_ds.preflight import validate_before_engines

    train = [json.loads(x) for x in (workspace / "data/train.jsonl").read_text().splitlines()][:16]
    held = [json.loads(x) for x in (workspace / "data/eval.jsonl").read_text().splitlines()][:6]
    folder = tmp_path / "both"
    folder.mkdir()
    write_rows(folder / "train.jsonl", train)
    write_rows(folder / "test.jsonl", held)
    with pytest.raises(ConfigError, match=r"has splits \['train', 'test'\]: set data.eval_split to the one to use"):
        load_rows(str(folder), None, "data.eval_path", split_key="data.eval_split")
    assert load_rows(str(folder), "test")["prompt"] == [r["prompt"] for r in held]
    assert load_rows(str(folder / "test.jsonl"), None)["prompt"] == [r["prompt"] for r in held]  # a file: one split

    config = write_config(workspace, "held_out", data={"eval_path": str(folder)})
    with pytest.raises(ConfigError, match=r"data.eval_path='.*both' has splits \['train', 'test'\]: set data.eval_"):
        validate_before_engines(load_config(config), world=1)
    prepared = validate_before_engines(load_config(config, ["data.eval_split=test"]), world=1)
    assert prepared.eval_rows["prompt"] == [r["prompt"] for r in held]
    assert "held-out prompts" not in capsys.readouterr().out  # the demo's sets share no prompt

    sft = tmp_path / "sft"  # a DatasetDict whose splits are not called train, with a file evaluation set
    splits = {"train_sft": datasets.Dataset.from_list(train), "test_sft": datasets.Dataset.from_list(held)}
    datasets.DatasetDict(splits).save_to_disk(str(sft))
    leaky = write_rows(tmp_path / "leaky.jsonl", held[:4] + train[:2])  # 2 training prompts in the held-out set
    overrides = [f"data.path={sft}", "data.split=train_sft", f"data.eval_path={leaky}"]
    prepared = validate_before_engines(load_config(config, overrides), world=1)
    assert len(prepared.train_rows) == 16 and len(prepared.eval_rows) == 6
    out = capsys.readouterr().out
    assert "warning: 2 of the 6 held-out prompts (data.eval_path) are also training prompts (data.path)" in out, out

    base = ["eval", str(workspace / "student"), "--data", str(folder), "--max-prompts", "2", "--max-new-tokens", "4"]
    assert cli.main(base) == 2
    assert "--data='" in (err := capsys.readouterr().err) and "set --split to the one to use" in err, err
    assert cli.main(base + ["--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_prompts"] == 2


def test_eval_samples_as_the_run_does_whatever_the_models_generation_config_asks(workspace, tmp_path, capsys):
    """`tropd-ds eval` draws from softmax(logits / T) alone, with the run's sampler, as the in-run evaluation
    does: a generation_config.json with a repetition penalty and no-repeat n-grams (which `generate` applies)
    changes nothing. Greedy, its completions are GenerateRollout's; `generate` would have given others."""
    import shutil

    import torch
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tropd_ds import cli
    from tropd_ds.rollout import GenerateRollout, end_token_ids

    folder = tmp_path / "penalised"
    shutil.copytree(workspace / "student", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig(repetition_penalty=50.0, no_repeat_ngram_size=1, eos_token_id=tok.eos_token_id)
    gen.save_pretrained(folder)
    rows = [json.loads(x) for x in (workspace / "data/eval.jsonl").read_text().splitlines()[:6]]
    records = tmp_path / "records.jsonl"
    code = cli.main(["eval", str(folder), "--data", str(workspace / "data/eval.jsonl"), "--max-prompts", "6",
                     "--max-new-tokens", "12", "--records", str(records)])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    got = [json.loads(x)["completions"][0] for x in records.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    sampler = GenerateRollout(model, tok.pad_token_id, end_token_ids(tok, model), gather=False, vocab=len(tok))
    want, by_generate = [], []
    for row in rows:
        ids = torch.tensor([tok(row["prompt"])["input_ids"]])
        greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
        out = sampler.generate(RolloutRequest(ids, torch.ones_like(ids)), greedy)
        want.append(tok.decode(out.input_ids[0, ids.shape[1] :][out.attention_mask[0, ids.shape[1] :].bool()],
                               skip_special_tokens=True))  # fmt: skip
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
        by_generate.append(tok.decode(g[0, ids.shape[1] :], skip_special_tokens=True))
    assert got == want
    assert by_generate != want  # the penalties do change greedy decoding: the test can tell the two apart
