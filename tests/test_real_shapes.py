"""Real vocabulary layouts on 2 CPU ranks: an lm_head with more rows than the tokenizer has tokens (every
Qwen2.5 model) trains, evaluates and exports; the rehearsal at the real widths of Llama-3.1, Qwen2.5, Mistral
and Gemma-2 lives in tests/test_rehearsal.py (`make rehearse`)."""

from __future__ import annotations

import json
import shutil

from biased_models import pad_vocabulary
from launch import launch, records, write_config

PADDED_ROWS = 32  # for the demo tokenizer's 18 tokens


def test_a_padded_lm_head_trains_evaluates_and_exports_with_only_real_tokens(workspace, tmp_path):
    """The demo pair grown to 32 rows for 18 tokens, each padding row as likely as '1' (a common token): before
    the sampler kept to real tokens, this run stopped at step 1 with `targets contains 22: expected ids in
    [0, 18)` in the kernels."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for role in ("student", "teacher"):
        shutil.copytree(workspace / role, tmp_path / role)
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    like = tok.convert_tokens_to_ids("1")
    for role in ("student", "teacher"):
        pad_vocabulary(tmp_path / role, PADDED_ROWS, like=like)
    shutil.copytree(workspace / "data", tmp_path / "data")
    config = write_config(
        tmp_path, "padded", optim={"steps": 3}, checkpoint={"every": 0}, eval={"max_prompts": 4, "temperature": 1.0},
        logging={"samples_every": 1, "progress": False},
    )  # fmt: skip
    launch(config)
    run = tmp_path / "padded"
    steps = [r for r in records(run) if "loss" in r]
    assert len(steps) == 3 and all(r["response_len"] > 0 for r in steps)
    evals = [r for r in records(run) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    for r in evals:  # completions decoded from real ids only (a padding id would decode to nothing)
        assert all(set(e["completion"]) <= set("0123456789+-=;#") for e in r["eval_examples"])
    # the export keeps the model's own rows
    with safe_open(str(run / "export/model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes["lm_head.weight"][0] == PADDED_ROWS and shapes["model.embed_tokens.weight"][0] == PADDED_ROWS
    assert json.loads((run / "export/config.json").read_text())["vocab_size"] == PADDED_ROWS
    assert AutoModelForCausalLM.from_pretrained(run / "export").config.vocab_size == PADDED_ROWS
