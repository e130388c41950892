"""Models and engines: the vocabulary check, ZeRO-3 aware loading, DeepSpeed configs checked against the
run config, the hidden-state base of both wrappers, and `initialize` for the engines.

The phase modules own their forwards: `scoring.TeacherScorer` and `update.StudentTerms` build on
`VocabHeadModel` here and make their engines with `load_causal_lm` and `initialize`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig, OptimConfig, looks_like_hub_id, read_ds_config

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


def vocab_from_configs(student: ModelConfig, teacher: ModelConfig) -> int:
    """Without tokenizers (a dry run on config-only folders): the smaller embedding table."""
    from transformers import AutoConfig

    check_model_folder(student, "student", weights=False)
    check_model_folder(teacher, "teacher", weights=False)
    return min(AutoConfig.from_pretrained(m.path).vocab_size for m in (student, teacher))


def load_tokenizers_and_check(student: ModelConfig, teacher: ModelConfig, weights: bool = True):
    """One vocabulary for both models, checked before anything is put on a device.

    Returns the shared tokenizer and the number of real vocabulary rows; rows past it (padding
    of an embedding table) are masked out by the caller."""
    from transformers import AutoConfig

    check_model_folder(student, "student", weights)
    check_model_folder(teacher, "teacher", weights)
    tok_s, tok_t = load_tokenizer(student.path, "student"), load_tokenizer(teacher.path, "teacher")
    if tok_s.get_vocab() != tok_t.get_vocab():
        only_s = len(set(tok_s.get_vocab()) - set(tok_t.get_vocab()))
        only_t = len(set(tok_t.get_vocab()) - set(tok_s.get_vocab()))
        raise ConfigError(
            f"student tokenizer ({student.path}, {len(tok_s)} tokens) and teacher tokenizer ({teacher.path}, "
            f"{len(tok_t)} tokens) differ ({only_s} tokens only in the student's, {only_t} only in the teacher's): "
            "token-level distillation needs one vocabulary"
        )
    n_tokens = len(tok_s)
    for role, cfg in (("student", student), ("teacher", teacher)):
        rows = AutoConfig.from_pretrained(cfg.path).vocab_size
        if rows < n_tokens:
            raise ConfigError(
                f"{role} embedding has {rows} rows but the shared tokenizer has {n_tokens} tokens: expected at least "
                f"{n_tokens}"
            )
    for role, cfg in (("student", student), ("teacher", teacher)):
        if weights and Path(cfg.path).is_dir():
            check_model_files(Path(cfg.path), role)
    check_end_token(tok_s, student.path, teacher.path)
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


def lr_schedule(optimizer, optim: OptimConfig):
    """transformers' scheduler `optim.schedule` over optim.steps with optim.warmup_steps of linear warm-up
    (from 0, transformers' convention); min_lr_ratio is the cosine_with_min_lr floor."""
    from transformers import get_scheduler

    kwargs = dict(optim.schedule_kwargs)
    if optim.schedule in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and "min_lr" not in kwargs:
        kwargs.setdefault("min_lr_rate", optim.min_lr_ratio)
    return get_scheduler(
        optim.schedule,
        optimizer,
        num_warmup_steps=optim.warmup_steps,
        num_training_steps=optim.steps,
        scheduler_specific_kwargs=kwargs,
    )


def check_lr_schedule(optim: OptimConfig) -> None:
    """The schedule built once on a throw-away optimiser: bad optim.schedule_kwargs fail before any engine."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr)
    try:
        lr_schedule(probe, optim)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"optim.schedule={optim.schedule!r} with optim.schedule_kwargs={optim.schedule_kwargs!r}: {exc}"
        ) from exc


_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}


def check_ds_config(
    role: str,
    cfg: ModelConfig,
    ds: dict,
    micro_batch: int,
    grad_accum: int,
    world: int,
    optim: OptimConfig | None = None,
) -> None:
    """The DeepSpeed config must not contradict the run config: the run config decides, so a
    different value in the DeepSpeed file is an error that names both."""
    where = f"{role}.ds_config={cfg.ds_config!r}"
    from .extras import require

    for monitor in ("tensorboard", "wandb"):
        section = ds.get(monitor)
        if isinstance(section, dict) and section.get("enabled"):
            require(monitor, f'{where} "{monitor}": {{"enabled": true}}')
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization is a {type(zero).__name__}: expected a JSON object")
    stage = zero.get("stage", 0)
    if stage != 3 or isinstance(stage, bool):
        kind = "" if isinstance(stage, int) else f" (a JSON {type(stage).__name__}; write the number 3, no quotes)"
        raise ConfigError(
            f"{where}: zero_optimization.stage={stage!r}{kind}: expected 3 (the {role} is sharded with ZeRO-3)"
        )
    for key, want in _PRECISION.items():
        on = bool(ds.get(key, {}).get("enabled", False))
        if on and cfg.dtype != want:
            raise ConfigError(
                f"{where} enables {key} but {role}.dtype={cfg.dtype!r}: expected {role}.dtype={want!r} (or disable "
                f"{key})"
            )
        if not on and cfg.dtype == want:
            raise ConfigError(
                f'{role}.dtype={cfg.dtype!r} but {where} does not enable {key}: add "{key}": {{"enabled": true}}'
            )
    implied = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
    }
    for key, want in implied.items():
        if key in ds and ds[key] not in (want, "auto"):
            raise ConfigError(
                f"{where}: {key}={ds[key]} contradicts the run config, which implies {want} "
                f"({role}.micro_batch_size, rollout.prompts_per_step x samples_per_prompt, {world} ranks): remove it "
                "or make them equal"
            )
    if optim is None:
        if "optimizer" in ds:
            raise ConfigError(f"{where} has an optimizer: the teacher is frozen, remove the 'optimizer' section")
        if zero.get("offload_optimizer", {}).get("device", "none") != "none":
            raise ConfigError(f"{where} offloads an optimizer: the teacher is frozen, remove offload_optimizer")
        return
    lr = ds.get("optimizer", {}).get("params", {}).get("lr")
    if lr not in (None, "auto") and not math.isclose(float(lr), optim.lr, rel_tol=1e-9):
        raise ConfigError(
            f"{where}: optimizer.params.lr={lr} contradicts optim.lr={optim.lr}: remove it or make them equal"
        )
    clip = ds.get("gradient_clipping")
    if clip not in (None, "auto") and not math.isclose(float(clip), optim.grad_clip, rel_tol=1e-9):
        raise ConfigError(
            f"{where}: gradient_clipping={clip} contradicts optim.grad_clip={optim.grad_clip}: remove it or make "
            "them equal"
        )
    if "scheduler" in ds:
        raise ConfigError(
            f"{where} has a scheduler: the run config's optim section sets the schedule (warmup_steps, "
            "min_lr_ratio); remove it"
        )


def _plain_linear(ds_config: dict) -> dict:
    """DeepSpeed's ZeRO-3 `memory_efficient_linear` (on unless a config says otherwise) replaces
    torch.nn.functional.linear for the whole process with an autograd.Function that saves the same
    tensors as torch's own: no memory is saved, and every linear call, in generation too, pays Python
    overhead (a third of a tiny model's decode step on CPU). Off unless the DeepSpeed config sets it."""
    ds_config.setdefault("zero_optimization", {}).setdefault("memory_efficient_linear", False)
    return ds_config


MONITORS = ("csv_monitor", "tensorboard", "comet")


def student_ds_config(
    cfg: ModelConfig, optim: OptimConfig, micro_batch: int, grad_accum: int, logging_dir: str | None = None
) -> dict:
    """The student's DeepSpeed config with the run config's batch, clipping and optimiser values; a monitor's
    relative output_path is taken under `logging_dir` (so runs never write into each other's files)."""
    ds_config = _plain_linear(read_ds_config(cfg.ds_config))
    for name in MONITORS:
        section = ds_config.get(name)
        if logging_dir and isinstance(section, dict) and section.get("enabled"):
            path = section.get("output_path") or "monitor"
            if not Path(path).is_absolute():
                section["output_path"] = str(Path(logging_dir) / path)
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch
    ds_config["gradient_accumulation_steps"] = grad_accum
    ds_config.pop("train_batch_size", None)
    ds_config["gradient_clipping"] = optim.grad_clip
    if "optimizer" in ds_config:  # DeepSpeed's own (fused / CPU-offload) optimiser from the config
        params = ds_config["optimizer"].setdefault("params", {})
        params.update(lr=optim.lr, betas=list(optim.betas), weight_decay=optim.weight_decay)
    else:
        ds_config.setdefault("zero_allow_untested_optimizer", True)
        ds_config.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds_config


def teacher_ds_config(cfg: ModelConfig) -> dict:
    ds_config = _plain_linear(read_ds_config(cfg.ds_config))
    ds_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds_config["gradient_accumulation_steps"] = 1
    ds_config.pop("train_batch_size", None)
    return ds_config


def initialize(model: nn.Module, ds_config: dict, optim: OptimConfig | None = None):
    """A DeepSpeed engine for `model`: with `optim`, a training engine (the DeepSpeed config's optimiser
    when it names one, else torch's AdamW; the run config's warm-up and cosine schedule); without, a
    frozen inference engine in eval mode."""
    import deepspeed

    if optim is None:
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine
    optimizer = None  # DeepSpeed's own (fused / CPU-offload) optimiser from the config
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoRA student's adapters only
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: lr_schedule(opt, optim),
    )
    return engine
