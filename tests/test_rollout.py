"""Rollout in micro-batches (rollout.micro_batch_size) gives the same tokens and masks as one batch."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from deepspeed.runtime.rollout import HybridEngineRollout, SamplingConfig

from tropd_ds import rollout
from tropd_ds.data import Prompt
from tropd_ds.demo_models import build_llama
from tropd_ds.demo_task import build_tokenizer


def test_generation_in_micro_batches_equals_one_batch(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    build_llama(tmp_path / "m", tok, hidden=32, layers=1, heads=2, mlp=64, seed=5)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    engine = HybridEngineRollout(SimpleNamespace(module=lm), tok)  # a plain module: no ZeRO, nothing to gather
    prompts = [Prompt(index=i, ids=tok(p)["input_ids"], response_ids=None, answer=None) for i, p in enumerate(("3+4=", "12-5+1=", "9=", "1+1+1+1+1=", "7-2="))]
    prefixes = [[], tok("3")["input_ids"], [], [], tok("5;")["input_ids"]]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    args = (engine, lm, prompts, prefixes, greedy, False, tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))
    whole = rollout.sample(*args)
    for micro in (1, 2, 3):
        parts = rollout.sample(*args, micro_batch=micro)
        for field in ("input_ids", "attention_mask", "sampled", "prefix"):
            assert torch.equal(getattr(parts, field), getattr(whole, field)), (micro, field)
    assert whole.prefix.sum() == 3 and whole.sampled.sum() == 5 * 6
