"""Tiny Llama-architecture models built from configs (no download), saved as Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import torch


def build_llama(
    out_dir: str | Path,
    tokenizer,
    hidden: int,
    layers: int,
    heads: int,
    mlp: int,
    seed: int = 0,
    max_positions: int = 128,
):
    """A randomly initialised LlamaForCausalLM with the tokenizer's vocabulary, saved with safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=mlp,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model
