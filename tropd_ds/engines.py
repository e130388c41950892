"""Engines: each model's DeepSpeed config (the DeepSpeed file with the run config's batch, clipping and
optimiser values, refused where the two contradict), the learning-rate schedule, and `initialize`, which makes
a training engine (the student) or a frozen inference engine (the teacher). Loading the models and checking
their files is tropd_ds/models.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig, OptimConfig, read_ds_config


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
