"""The rehearsal at real shapes (`make rehearse`, run by CI after `make test`): for each family's vocabulary
layout (tests/real_shapes.py: Llama-3.1's 128,256 rows; Qwen2.5's 152,064 rows for 151,665 tokens, untied, and
151,936 tied; Mistral's 32,768; Gemma-2's 256,000, tied, soft-capped attention), a tiny teacher and student
train 3 steps on 2 CPU ranks under the deepspeed launcher with the presets' objective, evaluate before and
after, and export. Gemma-2's final-logit soft-capping is refused before any engine (tests/test_logit_parity.py)."""

from __future__ import annotations

import json
import math

import pytest
from launch import launch, records, write_config
from real_shapes import LAYOUTS, build_pair

from tropd_ds.demo_task import write_splits

pytestmark = pytest.mark.rehearsal
PRESET_OBJECTIVE = {"name": "tropd", "options": {"k": 64, "beta": 0.001, "trust_mode": "bernoulli", "outlier": "fkl"}}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_real_vocabulary_layout_trains_evaluates_and_exports_on_two_ranks(tmp_path, name):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layout = LAYOUTS[name]
    build_pair(tmp_path, layout)
    write_splits(tmp_path / "data", n_train=64, n_eval=8)
    config = write_config(
        tmp_path, "run", objective=PRESET_OBJECTIVE, optim={"steps": 3}, checkpoint={"every": 0},
        eval={"max_prompts": 4, "temperature": 1.0}, logging={"samples_every": 1, "progress": False},
    )  # fmt: skip
    launch(config)  # the logit-parity check passed before step 1 (else the run stops with exit code 2)
    run = tmp_path / "run"
    steps = [r for r in records(run) if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["response_len"] > 0 for r in steps)
    assert [r["step"] for r in records(run) if "eval_accuracy" in r] == [0, 3]
    # a sampled id past the tokenizer would have stopped the run in the kernels' target check
    tok = AutoTokenizer.from_pretrained(run / "export")
    assert len(tok) == layout.tokens
    # the export keeps the family's own rows and tying
    lm = AutoModelForCausalLM.from_pretrained(run / "export")
    assert lm.config.vocab_size == layout.rows and lm.get_output_embeddings().weight.shape[0] == layout.rows
    assert bool(lm.config.tie_word_embeddings) == layout.tied
    with safe_open(str(run / "export/model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not layout.tied)
    assert json.loads((tmp_path / "layout.json").read_text())["rows"] == layout.rows
