"""The trainer under the real `deepspeed` launcher on 2 CPU ranks, with tiny Llama models built from
configs (teacher larger than the student), plus its checks that run before any engine starts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tropd_ds.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from launch import launch, records, write_config  # noqa: E402

STEP_KEYS = {
    "loss",
    "trust_fraction",
    "log_ratio_mean",
    "log_ratio_p1",
    "log_ratio_p10",
    "outlier_fkl_mean",
    "topk_mass_mean",
    "student_entropy_mean",
    "teacher_entropy_mean",
    "response_len",
    "prefix_len",
    "loss_trusted",
    "loss_outlier",
    "loss_guidance",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "time_rollout_s",
    "time_teacher_s",
    "time_update_s",
}


def test_guided_tropd_run_logs_every_metric_and_exports_a_loadable_student(full_run):
    run_dir, proc = full_run
    assert "offload_param=cpu" in proc.stdout  # the teacher engine runs with its parameters offloaded
    # gather_params auto (the default), decided per model and logged: tiny models are gathered whole
    for where in ("rollout", "teacher"):
        assert f"[tropd-ds] {where}.gather_params=auto: the model's 0.00 GiB against " in proc.stdout, proc.stdout
    assert proc.stdout.count(": gathered whole, hook-free") == 2
    assert "generation with all parameters gathered; teacher scoring with all parameters gathered" in proc.stdout
    steps = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert all(math.isfinite(r[k]) for k in STEP_KEYS), r
    assert sum(r["prefix_len"] for r in steps) > 0  # guidance from the teacher_response column happened
    evals = [r for r in records(run_dir) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 6]
    assert any("sample" in r for r in steps)
    # the CPU config's CSV monitor writes under this run's logging.dir, nowhere else
    assert list((run_dir / "logs").rglob("*.csv")), sorted(str(p) for p in run_dir.rglob("*"))[:40]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    tok = AutoTokenizer.from_pretrained(run_dir / "export")
    ids = tok("3+4=", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    initial = AutoModelForCausalLM.from_pretrained(run_dir.parent / "student")
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.state_dict().values())]
    assert any(moved), "the exported student equals the initial one: training changed nothing"
    assert sorted(p.name for p in (run_dir / "ckpt").glob("step*")) == ["step3", "step6"]


def test_tropd_ds_export_writes_what_the_run_exported_in_the_runs_dtype(full_run, workspace, tmp_path, capsys):
    """`tropd-ds export` of the fp32 run equals the run's own export bit for bit, although the student folder
    it takes the model's config from was saved in bf16 (it used to follow that folder's dtype); --dtype
    bfloat16 writes the run's weights cast to bf16."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tropd_ds import cli

    bf16 = tmp_path / "student_bf16"
    AutoModelForCausalLM.from_pretrained(workspace / "student").to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(workspace / "student").save_pretrained(bf16)
    config = write_config(workspace, "full")  # the full run's config, as it was written
    own = load_file(full_run[0] / "export/model.safetensors")
    assert {t.dtype for t in own.values()} == {torch.float32}
    for flags, dtype in (([], torch.float32), (["--dtype", "bfloat16"], torch.bfloat16)):
        out = tmp_path / f"export_{dtype}"
        code = cli.main(["export", "--config", str(config), "--set", f"student.path={bf16}", "--out", str(out), *flags])
        assert code == 0, capsys.readouterr().err[-2000:]
        written = load_file(out / "model.safetensors")
        assert written.keys() == own.keys()
        for name, tensor in own.items():
            assert written[name].dtype == dtype and torch.equal(written[name], tensor.to(dtype)), name
        assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    # a student of another size (the teacher's folder) is named, not a traceback from load_state_dict
    out = tmp_path / "other_size"
    assert cli.main(["export", "--config", str(config), "--set", f"student.path={workspace / 'teacher'}", "--out",
                     str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "checkpoint step6 does not match the student at" in err and "size mismatch" in err, err


# Stopping and resuming: tests/test_reliability.py (a signal on either rank, a crash while saving, SIGKILL)
# resumes checkpoints and compares every step with the uninterrupted run; tests/test_launchers.py stops
# torchrun and accelerate runs with checkpoint.stop_after.


# ----------------------------------------------------------------------------- before any engine starts


def run_main(*argv: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tropd_ds.train", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WORLD_SIZE": "1"},
    )
    return proc.returncode, proc.stderr


def test_missing_model_folder_is_a_clear_error(workspace):
    code, err = run_main("--config", str(write_config(workspace, "bad1")), "--set", "student.path=/nonexistent/model")
    assert code == 2 and "student.path='/nonexistent/model': expected a Hugging Face model folder" in err


def test_data_without_prompt_column_and_empty_data_are_clear_errors(workspace):
    bad = workspace / "noprompt.jsonl"
    bad.write_text('{"question": "1+1=", "answer": "2"}\n')
    code, err = run_main("--config", str(write_config(workspace, "bad2")), "--set", f"data.path={bad}")
    assert code == 2 and "expected a prompt column 'prompt' (data.prompt_column)" in err and "question" in err
    empty = workspace / "empty.jsonl"
    empty.write_text("")
    code, err = run_main("--config", str(write_config(workspace, "bad3")), "--set", f"data.path={empty}")
    assert code == 2 and "is empty: expected at least one row" in err, err


def test_teacher_with_a_different_tokenizer_is_refused_before_loading(workspace, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "teacher")
    tok.add_tokens(["<extra>"])
    other = tmp_path / "teacher2"
    other.mkdir()
    tok.save_pretrained(other)
    (other / "config.json").write_text((workspace / "teacher/config.json").read_text())
    code, err = run_main("--config", str(write_config(workspace, "bad4")), "--set", f"teacher.path={other}")
    assert code == 2 and "has a config.json but no weights" in err
    (other / "model.safetensors").symlink_to(workspace / "teacher/model.safetensors")
    code, err = run_main("--config", str(write_config(workspace, "bad4")), "--set", f"teacher.path={other}")
    assert code == 2 and "tokenizer" in err and "differ" in err


def test_batch_shapes_that_do_not_divide_are_refused(workspace):
    code, err = run_main("--config", str(write_config(workspace, "bad5")), "--set", "student.micro_batch_size=3")
    assert code == 2 and "student.micro_batch_size=3 does not divide the 8 rollouts per rank" in err


def test_k_beyond_the_vocabulary_is_refused_only_where_a_topk_term_uses_it(workspace):
    from tropd_ds.preflight import validate_before_engines

    n_tokens = validate_before_engines(
        load_config(write_config(workspace, "k1"), ["objective.name=opd", "objective.options={}"])
    )[1]
    assert n_tokens < 64  # opd passed with the default k = 64: its teacher pass uses k = 1
    too_big = n_tokens + 1
    with pytest.raises(
        ConfigError, match=rf"objective.options.k={too_big} exceeds the vocabulary \({n_tokens} tokens\)"
    ):
        validate_before_engines(
            load_config(write_config(workspace, "k2"), ["objective.name=tropd", f"objective.options={{k: {too_big}}}"])
        )
    with pytest.raises(ConfigError, match=rf"objective.options.k_end={too_big} exceeds"):
        validate_before_engines(
            load_config(
                write_config(workspace, "k3"),
                ["objective.name=fkl_topk", f"objective.options={{k: 2, k_end: {too_big}}}"],
            )
        )


def test_unknown_config_key_suggests_the_closest(workspace):
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.max_new_token'; did you mean 'max_new_tokens'"):
        load_config(write_config(workspace, "bad6"), ["rollout.max_new_token=3"])
    with pytest.raises(ConfigError, match=r"optim.lr='fast': expected float"):
        load_config(write_config(workspace, "bad7"), ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"config file '/nope.yaml' does not exist"):
        load_config("/nope.yaml")


def test_set_overrides_any_field_and_paths_resolve_against_the_config(workspace):
    cfg = load_config(
        write_config(workspace, "ok"),
        [
            "objective.name=opd",
            "objective.options={}",
            "rollout.temperature=0.7",
            "optim.lr=3e-3",
        ],
    )
    assert cfg.objective.name == "opd" and cfg.objective.options == {} and cfg.rollout.temperature == 0.7
    assert cfg.optim.lr == 0.003  # YAML 1.1 reads 3e-3 as a string; float fields accept it
    assert Path(cfg.student.path).is_absolute()


def test_prompt_stream_is_deterministic_sharded_resumable_and_counts_long_prompts(workspace):
    from transformers import AutoTokenizer

    from tropd_ds.data import PromptStream, load_rows

    rows = load_rows(str(workspace / "data/train.jsonl"))
    tok = AutoTokenizer.from_pretrained(workspace / "student")
    streams = [PromptStream(rows, tok, 4, r, 2, seed=5, max_prompt_tokens=8, long_prompts="truncate") for r in range(2)]
    first = [[p.index for p in s.next_batch()] for s in streams]
    assert len(first[0]) == 2 and not set(first[0]) & set(first[1])
    state = streams[0].state_dict()
    after = [p.index for p in streams[0].next_batch()]
    again = PromptStream(rows, tok, 4, 0, 2, seed=5, max_prompt_tokens=8, long_prompts="truncate")
    again.load_state_dict(state)
    assert [p.index for p in again.next_batch()] == after
    assert all(len(p.ids) <= 8 for p in again.next_batch())
    assert again.truncated > 0  # 4-5 operand prompts are 8-10 characters
    skipping = PromptStream(rows, tok, 2, 0, 1, seed=5, max_prompt_tokens=8, long_prompts="skip")
    kept = skipping.next_batch()
    assert all(len(p.ids) <= 8 for p in kept) and skipping.skipped > 0


def test_export_and_eval_commands_on_the_finished_run(workspace, full_run, tmp_path):
    from safetensors.torch import load_file

    run_dir, _ = full_run
    cli = str(Path(sys.executable).with_name("tropd-ds"))
    out = tmp_path / "exported"
    proc = subprocess.run(
        [cli, "export", "--config", str(workspace / "full.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, runs = load_file(out / "model.safetensors"), load_file(run_dir / "export/model.safetensors")
    assert sorted(ours) == sorted(runs) and all(bool((ours[k] == runs[k]).all()) for k in ours)
    proc = subprocess.run(
        [
            cli,
            "eval",
            str(out),
            "--data",
            str(workspace / "data/eval.jsonl"),
            "--max-prompts",
            "8",
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval_completions"] == 8
    # greedy on the same 8 held-out prompts as the run's final evaluation of the same weights: the same figure
    final = [r for r in records(workspace / "full") if "eval_accuracy" in r][-1]
    assert result["eval_accuracy"] == final["eval_accuracy"], (result, final["eval_accuracy"])
    bad = subprocess.run(
        [cli, "export", "--config", str(workspace / "full.yaml"), "--out", str(out), "--tag", "step99"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "checkpoint tag 'step99' is not in" in bad.stderr and "step6" in bad.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_shipped_deepspeed_configs_are_zero3_and_teachers_offload(name):
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    if "teacher" in name:
        assert cfg["zero_optimization"]["offload_param"]["device"] in ("cpu", "nvme")
        assert "optimizer" not in cfg


def test_teacher_generated_prefixes_with_a_teacher_micro_batch_of_its_own(workspace):
    """The data has no teacher responses: every prefix the run sees was generated by the teacher."""
    run = "teachergen"
    rows = [json.loads(x) for x in (workspace / "data/train.jsonl").read_text().splitlines()]
    bare = workspace / "data/train_no_responses.jsonl"
    bare.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    proc = launch(
        write_config(
            workspace,
            run,
            data={"path": str(bare)},
            rollout={"prefix_source": "teacher", "gather_params": False},
            teacher={"micro_batch_size": 3, "gather_params": True},  # an offloaded teacher generates gathered
            optim={"steps": 2},
            checkpoint={"every": 0},
            eval={"max_prompts": 2},
        )
    )
    steps = [r for r in records(workspace / run) if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert sum(r["prefix_len"] for r in steps) > 0
    assert "offload_param=cpu" in proc.stdout
    assert "generation layer by layer" in proc.stdout  # ZeRO-3 generation without gathering the whole student


def test_answers_are_extracted_from_boxed_hash_or_last_number():
    from tropd_ds.demo_task import make_problem
    from tropd_ds.evaluation import extract_answer, is_correct

    assert extract_answer(r"so \boxed{42} and 7") == "42"
    assert extract_answer("8+4=12;12-1=11;#11") == "11"
    assert extract_answer("the total is 1,234.") == "1234"
    assert extract_answer("no digits") is None
    import random

    row = make_problem(random.Random(0))
    assert is_correct(row["teacher_response"], row["answer"])
    assert not is_correct(row["teacher_response"] + "0", row["answer"])


def test_chat_prompts_are_rendered_with_the_tokenizer_template(workspace):
    from transformers import AutoTokenizer

    from tropd_ds.data import render_prompt

    tok = AutoTokenizer.from_pretrained(workspace / "student")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
    assert render_prompt(tok, [{"role": "user", "content": "1+2"}], chat_template=False) == "1+2="
    assert render_prompt(tok, "3+4", chat_template=True) == "3+4="
    assert render_prompt(tok, "3+4=", chat_template=False) == "3+4="


def test_padded_embedding_rows_beyond_the_tokenizer_are_masked_out(workspace):
    import torch
    import tropd_kernels as tk
    from transformers import AutoModelForCausalLM

    from tropd_ds.update import StudentTerms

    lm = AutoModelForCausalLM.from_pretrained(workspace / "student")
    n = lm.config.vocab_size
    padded = AutoModelForCausalLM.from_pretrained(workspace / "student")
    padded.resize_token_embeddings(n + 6)
    with torch.no_grad():
        padded.lm_head.weight[n:] = 50.0  # would dominate every softmax if it were not masked
    ids = torch.randint(3, n, (2, 7), generator=torch.Generator().manual_seed(0))
    select = torch.ones(2, 6, dtype=torch.bool)
    targets = ids[:, 1:][select]
    teacher = tk.teacher_topk(torch.randn(len(targets), n), targets, 4)
    args = (ids, torch.ones_like(ids), select, teacher)
    plain = StudentTerms(lm, n)(*args, options=tk.KernelOptions())
    masked = StudentTerms(padded, n)(*args, options=tk.KernelOptions())
    for a, b in zip(plain, masked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_data_loads_from_parquet_and_from_a_saved_datasets_folder(tmp_path):
    import datasets

    from tropd_ds.data import load_rows

    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4-1=", "answer": "3"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for path in ("d.parquet", "saved", "saved_dict"):
        assert load_rows(str(tmp_path / path))["prompt"] == ["1+2=", "4-1="]
    with pytest.raises(ConfigError, match=r"has splits \['train'\]: data.split='test' is not one of them"):
        load_rows(str(tmp_path / "saved_dict"), split="test")
    with pytest.raises(ConfigError, match=r"unknown file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        load_rows(str(tmp_path / "x.txt"))


def test_one_sampling_distribution_is_enforced_before_any_engine(workspace):
    with pytest.raises(ConfigError, match=r"unknown config key 'objective.temperature': .* rollout.temperature"):
        load_config(write_config(workspace, "temp"), ["objective.temperature=0.7"])
    with pytest.raises(
        ConfigError, match=r"rollout.top_p=0.9 with objective.name='tropd': top-p sampling draws from a truncated"
    ):
        load_config(write_config(workspace, "topp"), ["rollout.top_p=0.9"])
    cfg = load_config(write_config(workspace, "topp_fkl"), ["rollout.top_p=0.9", "objective.name=fkl_topk"])
    assert cfg.rollout.top_p == 0.9  # no log-ratio in the top-k forward KL: top-p is allowed there
    with pytest.raises(ConfigError, match=r"rollout.guidance_max_len=20 exceeds rollout.max_new_tokens=12"):
        load_config(write_config(workspace, "lmax"), ["rollout.guidance_max_len=20"])


def test_ppo_clip_is_refused_before_any_engine(workspace):
    from tropd_ds.preflight import validate_before_engines

    with pytest.raises(
        ConfigError, match=r"objective.options.ppo_clip=0.2: the trainer makes one update per rollout batch"
    ):
        validate_before_engines(
            load_config(write_config(workspace, "ppo"), ["objective.name=opd", "objective.options={ppo_clip: 0.2}"])
        )


def test_an_export_that_meets_a_rotating_checkpoint_takes_the_newest_again(full_run, workspace, tmp_path, monkeypatch):
    """`tropd-ds export` while a run rotates its checkpoints used to die on a vanished step folder: the newest
    checkpoint is deleted while DeepSpeed reads it (the deletion runs inside the real reader, which then fails
    as it would); the export takes the new newest, or, for a checkpoint named with --tag, says what happened."""
    import shutil

    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    from tropd_ds import export

    ckpt = tmp_path / "ckpt"
    shutil.copytree(full_run[0] / "ckpt", ckpt)
    real = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
    seen = []

    def rotated_while_read(folder, tag=None, **kwargs):
        seen.append(tag)
        if tag == "step6":  # the run's keep_last rotation deletes it just as the reader starts
            shutil.rmtree(Path(folder) / tag)
        return real(folder, tag=tag, **kwargs)

    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", rotated_while_read)
    said = []
    source = export.export_from_checkpoint(str(ckpt), str(workspace / "student"), str(tmp_path / "a"), log=said.append)
    assert source == str(ckpt / "step3") and seen == ["step6", "step3"]
    assert said == ["checkpoint step6 went away while it was being read (a running run's rotation?): trying the newest "
                    "again"]  # fmt: skip
    assert (tmp_path / "a/model.safetensors").is_file()
    shutil.copytree(full_run[0] / "ckpt/step6", ckpt / "step6")
    with pytest.raises(ConfigError, match=r"checkpoint step6 in .* was deleted while it was being read"):
        export.export_from_checkpoint(str(ckpt), str(workspace / "student"), str(tmp_path / "b"), tag="step6")
