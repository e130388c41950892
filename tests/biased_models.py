"""Tiny Llama students with chosen next-token logits, for rollout tests: every position's logits are
about `biases[token]` for the named tokens and 0 for the rest, whatever the context."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def build_biased_llama(
    out_dir: Path, tokenizer, biases: dict[int, float], eos_ids=None, generation: dict | None = None, hidden: int = 32
):
    """One residual dimension is held constant (embedding column 0 = 4, no layer writes to it), so after
    the final norm it is about sqrt(hidden) at every position; the lm_head reads only that dimension."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tropd_ds.demo_models import build_llama

    build_llama(out_dir, tokenizer, hidden=hidden, layers=1, heads=2, mlp=64, seed=3)
    lm = AutoModelForCausalLM.from_pretrained(out_dir)
    with torch.no_grad():
        lm.model.embed_tokens.weight[:, 0] = 4.0
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        lm.model.norm.weight.fill_(1.0)
        lm.lm_head.weight.zero_()
        for token, logit in biases.items():
            lm.lm_head.weight[token, 0] = logit / math.sqrt(hidden)
    if eos_ids is not None or generation:
        lm.generation_config = GenerationConfig(**{"eos_token_id": eos_ids, **(generation or {})})
    lm.save_pretrained(out_dir, safe_serialization=True)
    return lm


def pad_vocabulary(folder: Path, rows: int, like: int, scale: float = 1.0):
    """The model saved in `folder` with its embedding and lm_head grown to `rows` rows (more than the tokenizer
    has tokens, as Qwen2.5's 152,064 rows for 151,665 tokens), each padding row of the lm_head a copy of
    token `like`'s row times `scale`: at scale 1 a padding id is as likely as that token, above 1 likelier.
    The config's vocab_size becomes `rows`; the tokenizer is unchanged."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folder)
    n = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        head = lm.get_output_embeddings().weight
        head[n:] = head[like] * scale
        lm.get_input_embeddings().weight[n:] = lm.get_input_embeddings().weight[like]
    assert lm.config.vocab_size == rows
    lm.save_pretrained(folder, safe_serialization=True)
    return lm
