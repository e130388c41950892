"""Models: the checks of model folders and tokenizers (one vocabulary for both), ZeRO-3 aware loading, and
the hidden-state base of both wrappers. DeepSpeed configs and engines are tropd_ds/engines.py.

The phase modules own their forwards: `scoring.TeacherScorer` and `update.StudentTerms` build on
`VocabHeadModel` here, load with `load_causal_lm` and make their engines with `engines.initialize`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig, looks_like_hub_id

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model_folder(cfg: ModelConfig, role: str, weights: bool = True) -> None:
    if cfg.path and looks_like_hub_id(cfg.path) and not Path(cfg.path).exists():
        check_hub_model(cfg, role)
    elif not cfg.path or not (Path(cfg.path) / "config.json").is_file():
        raise ConfigError(
            f"{role}.path={cfg.path!r}: expected a Hugging Face model folder with config.json, or a hub id such as "
            "org/name"
        )
    elif weights and not any(any(Path(cfg.path).glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(
            f"{role}.path={cfg.path!r} has a config.json but no weights (*.safetensors or *.bin): point it at a "
            "downloaded "
            "checkpoint, or check the config without weights with `tropd-ds train --config ... --dry-run`"
        )
    if not cfg.ds_config or not Path(cfg.ds_config).is_file():
        raise ConfigError(
            f"{role}.ds_config={cfg.ds_config!r}: expected a DeepSpeed JSON config file (see ds_configs/)"
        )
    if Path(cfg.path).is_dir():
        read_model_config(Path(cfg.path), role)


def read_model_config(folder: Path, role: str) -> dict:
    """config.json as a dict; a syntax error names the file, line and column."""

    where = f"{role}.path={str(folder)!r}"
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: config.json:{exc.lineno}:{exc.colno} is not valid JSON: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: config.json cannot be read: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{where}: config.json has no 'model_type': expected a Hugging Face model config")
    return config


def check_model_files(folder: Path, role: str) -> None:
    """Every safetensors file has a readable header and the embedding agrees with the config's vocab_size
    and hidden size. A truncated download is found here, not after the engines."""
    from safetensors import safe_open

    where = f"{role}.path={str(folder)!r}"
    config = read_model_config(folder, role)
    for index in sorted(folder.glob("*.index.json")):  # a sharded checkpoint: every shard it names is there
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{where}: {index.name} cannot be read as a shard index ({type(exc).__name__})") from exc
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ConfigError(
                f"{where}: {index.name} names {len(shards)} weight files and {len(missing)} are missing "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): an interrupted download? Download "
                "the model again"
            )

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
            raise ConfigError(
                f"{where}: {path.name} cannot be read ({type(exc).__name__}: {exc}): a truncated or damaged download? "
                "Download the weights again"
            ) from exc
        size = path.stat().st_size
        for name, shape in shapes.items():
            if name.endswith("embed_tokens.weight") and vocab and hidden and list(shape) != [vocab, hidden]:
                raise ConfigError(
                    f"{where}: {path.name} holds {name} of shape {list(shape)} but config.json says vocab_size={vocab},"
                    f" hidden_size={hidden}: the weights and the config are from different models"
                )
        if size < 8:
            raise ConfigError(f"{where}: {path.name} has {size} bytes: a truncated download? Download it again")


def check_hub_model(cfg: ModelConfig, role: str) -> None:
    """A hub id: its config must resolve (from the hub, or from the local cache when HF_HUB_OFFLINE=1)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(cfg.path)
    except Exception as exc:  # OSError, ValueError, connection errors from huggingface_hub
        raise ConfigError(
            f"{role}.path={cfg.path!r} is not a local folder (relative paths are taken from the config's folder), "
            "and as a hub "
            f"id it does not resolve: {type(exc).__name__}: {str(exc).splitlines()[0]}. Offline, the model must be "
            "in the "
            "hub cache (HF_HOME / HF_HUB_CACHE) with HF_HUB_OFFLINE=1"
        ) from exc


def teacher_roles(teacher) -> list[tuple[str, ModelConfig]]:
    """The teachers to check as (role, config): one ModelConfig is "teacher"; a list is given as (role, config)
    pairs (several teachers, teachers.<name>); None (a served teacher) is none."""
    if teacher is None:
        return []
    return list(teacher) if isinstance(teacher, (list, tuple)) else [("teacher", teacher)]


def vocab_from_configs(student: ModelConfig, teacher) -> int:
    """Without tokenizers (a dry run on config-only folders): the smaller embedding table. `teacher` None: a
    served teacher (its service checks its own side); a list: several teachers as (role, config)."""
    from transformers import AutoConfig

    models = [(student, "student")] + [(cfg, role) for role, cfg in teacher_roles(teacher)]
    for cfg, role in models:
        check_model_folder(cfg, role, weights=False)
    return min(AutoConfig.from_pretrained(cfg.path).vocab_size for cfg, _ in models)


def load_tokenizers_and_check(student: ModelConfig, teacher, weights: bool = True):
    """One vocabulary for the student and every teacher, checked before anything is put on a device. `teacher`
    None: a served teacher, whose tokenizer the trainer compares with the student's once the service answers;
    a list: several teachers, as (role, config) pairs.

    Returns the shared tokenizer and the number of real vocabulary rows; rows past it (padding
    of an embedding table) are masked out by the caller."""
    from transformers import AutoConfig

    models = [("student", student)] + teacher_roles(teacher)
    for role, cfg in models:
        check_model_folder(cfg, role, weights)
    tok_s = load_tokenizer(student.path, "student")
    for role, cfg in models[1:]:
        tok_t = load_tokenizer(cfg.path, role)
        if tok_s.get_vocab() != tok_t.get_vocab():
            only_s = len(set(tok_s.get_vocab()) - set(tok_t.get_vocab()))
            only_t = len(set(tok_t.get_vocab()) - set(tok_s.get_vocab()))
            raise ConfigError(
                f"student tokenizer ({student.path}, {len(tok_s)} tokens) and {role} tokenizer ({cfg.path}, "
                f"{len(tok_t)} tokens) differ ({only_s} tokens only in the student's, {only_t} only in the {role}'s): "
                "token-level distillation needs one vocabulary"
            )
    n_tokens = len(tok_s)
    for role, cfg in models:
        rows = AutoConfig.from_pretrained(cfg.path).vocab_size
        if rows < n_tokens:
            raise ConfigError(
                f"{role} embedding has {rows} rows but the shared tokenizer has {n_tokens} tokens: expected at least "
                f"{n_tokens}"
            )
    for role, cfg in models:
        if weights and Path(cfg.path).is_dir():
            check_model_files(Path(cfg.path), role)
    check_end_token(tok_s, *(cfg.path for _, cfg in models))
    if tok_s.pad_token_id is None:
        tok_s.pad_token = tok_s.eos_token
    return tok_s, n_tokens


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str, role: str):
    """The model folder's tokenizer; a folder without tokenizer files, or files the tokenizer cannot read,
    named before any engine (transformers' own error speaks of slow-tokenizer conversion)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{role}.path={path!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy the model's "
            "tokenizer into the folder (tokenizer.save_pretrained(folder))"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises ValueError, OSError, JSON errors... for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"{role}.path={path!r}: its tokenizer cannot be loaded ({type(exc).__name__}: {first[:300]}): check the "
            "tokenizer files in the folder"
        ) from exc


def check_end_token(tokenizer, *paths: str) -> None:
    """A response ends at an end-of-sequence token: the tokenizer's, or one named by either model's
    generation_config.json / config.json. Without one no rollout could end (found here, not after the engines)."""
    from transformers import GenerationConfig

    if tokenizer.eos_token_id is not None:
        return
    for path in paths:
        try:
            if GenerationConfig.from_pretrained(path).eos_token_id is not None:
                return
        except Exception:  # no generation_config.json: transformers builds none
            pass
        if Path(path).is_dir() and read_model_config(Path(path), "model").get("eos_token_id") is not None:
            return
    raise ConfigError(
        f"no end-of-sequence token: the tokenizer of {paths[0]!r} has no eos_token, and neither model's "
        "generation_config.json nor config.json names an eos_token_id: set eos_token in tokenizer_config.json"
    )


def load_causal_lm(cfg: ModelConfig, ds_config: dict):
    """from_pretrained under HfDeepSpeedConfig: with ZeRO-3 each rank materialises only its shard."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers reads it through a weak reference)
    model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=DTYPES[cfg.dtype])
    return model, keep_alive


SOFTCAP_FIELDS = ("final_logit_softcapping",)  # Gemma-2/3: logits = c tanh(logits / c)


def logit_scale(config) -> float:
    """The factor an architecture applies to h W^T before the softmax: Cohere's `logit_scale`
    (multiplies), Granite's `logits_scaling` (divides); 1.0 for everything else."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(text, "model_type", "").startswith("cohere") and getattr(text, "logit_scale", None) is not None:
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None) is not None:
        scale /= float(text.logits_scaling)
    return scale


def check_logit_transforms(path: str, role: str) -> None:
    """Refuse, before any engine, a model whose logits are not an affine function of its final hidden
    states: the fused kernels reduce the vocabulary from h W^T + b and cannot apply it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in SOFTCAP_FIELDS:
        value = getattr(text, name, None)
        if value:
            raise ConfigError(
                f"{role}.path={path!r}: its config sets {name}={value} (logits soft-capped as c tanh(logits / c)), "
                "which "
                "the vocabulary kernels cannot apply (they reduce h W^T chunk by chunk); tropd-ds would train "
                "against another "
                f"distribution than the model's. Accepted: models without {name} (or with it null)"
            )


class VocabHeadModel(nn.Module):
    """A causal LM whose forward ends at its final hidden states: the phase modules' wrappers
    (`scoring.TeacherScorer`, `update.StudentTerms`) reduce the vocabulary from them with `tropd_kernels`
    inside their own forward, so that under ZeRO-3 the partitioned lm_head weight is gathered for the
    call (and, for the student, for its backward)."""

    def __init__(self, lm, n_tokens: int):
        super().__init__()
        self.lm = lm
        self.n_tokens = n_tokens
        self.logit_scale = logit_scale(lm.config)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)

    def hidden_states(self, input_ids, attention_mask):
        """Final hidden states of every position but the last, each row positioned as generation positioned
        it: left padding takes no position (absolute position embeddings, GPT-2, need exactly this; with
        RoPE it removes a bf16 drift of ~2e-3 at 1,000 pads)."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )  # no KV cache: nothing decodes after this forward
        hidden = out.last_hidden_state[:, :-1]
        return hidden * self.logit_scale if self.logit_scale != 1.0 else hidden  # s (h W^T) = (s h) W^T

    def head(self):
        """The lm_head (weight, bias), all of its rows: the kernels mask out those past `n_tokens` (padding of
        the embedding table, 152,064 rows for Qwen2.5's 151,665 tokens), and the logits keep the padded,
        aligned row stride (vector loads in the Triton kernels, cuBLAS's fast paths). Cohere / Granite logit
        scaling folded into the bias (the hidden states carry it)."""
        head = self.lm.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if bias is not None and self.logit_scale != 1.0:
            bias = bias * self.logit_scale
        return weight, bias
