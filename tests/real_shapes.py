"""Config-only models with the vocabulary layouts of real families, at tiny depth and width: the real
number of embedding rows, the real tokenizer size, special tokens at their real ids, tied or untied heads,
each family's own architecture class. Tokenizers are built to the same sizes (the demo task's characters
at ordinary ids, filler tokens elsewhere), so a run sees what it would see with the real model's vocabulary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tropd_ds.demo_task import CHARS


@dataclass
class Layout:
    name: str
    model_type: str
    rows: int  # embedding / lm_head rows (config vocab_size)
    tokens: int  # tokenizer size (len(tokenizer))
    specials: dict  # id -> token text
    bos: int | None
    eos: int  # the tokenizer's EOS
    end_ids: list  # generation_config.eos_token_id
    pad: int | None  # None: the family ships no pad token (tropd-ds uses EOS)
    tied: bool
    extra: dict = field(default_factory=dict)  # architecture-specific config fields


LAYOUTS = {
    "llama-3.1": Layout(
        "llama-3.1", "llama", 128256, 128256,
        {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"},
        bos=128000, eos=128009, end_ids=[128001, 128008, 128009], pad=None, tied=False,
        extra={"rope_theta": 500000.0},
    ),
    "qwen2.5": Layout(
        "qwen2.5", "qwen2", 152064, 151665,
        {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
        bos=None, eos=151645, end_ids=[151645, 151643], pad=151643, tied=False,
    ),
    "qwen2.5-tied": Layout(
        "qwen2.5-tied", "qwen2", 151936, 151665,
        {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
        bos=None, eos=151645, end_ids=[151645, 151643], pad=151643, tied=True,
    ),
    "mistral-v0.3": Layout(
        "mistral-v0.3", "mistral", 32768, 32768, {0: "<unk>", 1: "<s>", 2: "</s>"},
        bos=1, eos=2, end_ids=[2], pad=None, tied=False,
    ),
    "gemma-2": Layout(
        "gemma-2", "gemma2", 256000, 256000, {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"},
        bos=2, eos=1, end_ids=[1, 107], pad=0, tied=True,
        extra={"final_logit_softcapping": None, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 8,
               "sliding_window": 64},
    ),
}  # fmt: skip
CHARS_AT = 1000  # the demo task's characters sit at ids 1000.. (ordinary tokens of every family)


def build_tokenizer(layout: Layout):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<f{i}>": i for i in range(layout.tokens)}
    for i, ch in enumerate(CHARS):
        del vocab[f"<f{CHARS_AT + i}>"]
        vocab[ch] = CHARS_AT + i
    for i, text in layout.specials.items():
        del vocab[f"<f{i}>"]
        vocab[text] = i
    unk = layout.specials.get(0, layout.specials[layout.eos])
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(text, special=True) for text in layout.specials.values()])
    special = {
        "eos_token": layout.specials[layout.eos],
        "bos_token": layout.specials[layout.bos] if layout.bos is not None else None,
        "pad_token": layout.specials[layout.pad] if layout.pad is not None else None,
    }
    out = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **special)
    assert len(out) == layout.tokens and out.eos_token_id == layout.eos
    return out


def build_model(folder: Path, layout: Layout, tokenizer, hidden: int, layers: int, seed: int) -> None:
    """A randomly initialised model of the family's architecture with the layout's rows, saved with safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    heads = 2
    config = AutoConfig.for_model(
        layout.model_type,
        vocab_size=layout.rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=hidden // heads,
        max_position_embeddings=256,
        tie_word_embeddings=layout.tied,
        bos_token_id=layout.bos,
        eos_token_id=layout.end_ids if len(layout.end_ids) > 1 else layout.eos,
        pad_token_id=layout.pad,
        **layout.extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=layout.bos, eos_token_id=layout.end_ids, pad_token_id=layout.pad
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def build_pair(root: Path, layout: Layout) -> Path:
    """teacher/ and student/ of the layout under root (teacher wider and deeper), tokenizer saved with each."""
    tok = build_tokenizer(layout)
    build_model(root / "teacher", layout, tok, hidden=32, layers=2, seed=1)
    build_model(root / "student", layout, tok, hidden=16, layers=1, seed=2)
    (root / "layout.json").write_text(json.dumps(layout.__dict__))
    return root
