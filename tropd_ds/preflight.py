"""Pre-flight checks: everything that can be found wrong before a minute of compute is spent.

`validate_before_engines` checks files, data columns, vocabulary, objective options and the batch
arithmetic without any device; `check_logit_parity` runs once the engines exist, before step 1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import tropd_kernels as tk

from . import collectives
from .config import ConfigError, RunConfig, micro_batches_per_rank, read_ds_config
from .data import Columns, check_rows, check_template_kwargs, encode_prompt, load_rows
from .extras import require
from .models import (
    check_ds_config,
    check_logit_transforms,
    check_lr_schedule,
    load_tokenizers_and_check,
    vocab_from_configs,
)
from .objectives import Objective, loss_fn


class Prepared(NamedTuple):
    """What the checks loaded, handed to the run: the shared tokenizer (None in a dry run on config-only
    folders), the vocabulary size, the data sets and the objective."""

    tokenizer: object
    n_tokens: int
    train_rows: object
    eval_rows: object
    objective: Objective


def validate_before_engines(cfg: RunConfig, world: int | None = None, dry_run: bool = False) -> Prepared:
    """Everything that can be checked without a device: files, columns, rows, vocabulary, batch shapes.

    With `dry_run`, model folders may hold only config.json (no weights, no tokenizer): the
    vocabulary then comes from the configs and the tokenizer is None."""
    if dry_run and not all(has_tokenizer(m.path) for m in (cfg.student, cfg.teacher)):
        tokenizer, n_tokens = None, vocab_from_configs(cfg.student, cfg.teacher)
    else:
        tokenizer, n_tokens = load_tokenizers_and_check(cfg.student, cfg.teacher, weights=not dry_run)
    if cfg.student.lora:
        from .lora import check as check_lora

        check_lora(cfg.student.path, cfg.student.lora)
    check_logit_transforms(cfg.student.path, "student")
    check_logit_transforms(cfg.teacher.path, "teacher")
    columns = Columns.of(cfg.data)
    train_rows = load_rows(cfg.data.path, cfg.data.split, "data.path", columns)
    eval_rows = None
    if cfg.data.eval_path:
        eval_rows = load_rows(cfg.data.eval_path, cfg.data.split, "data.eval_path", columns)
        if "answer" not in eval_rows.column_names:
            raise ConfigError(
                f"data.eval_path={cfg.data.eval_path!r} has columns {eval_rows.column_names}: evaluation needs an "
                f"answer column {columns.answer!r} (data.answer_column)"
            )
    if eval_rows is not None and cfg.eval.answer_check == "math_verify":
        require("math_verify", "eval.answer_check=math_verify (or set eval.answer_check=exact)")
    objective = check_objective(cfg, n_tokens)
    if (
        cfg.rollout.guidance
        and cfg.rollout.prefix_source == "data"
        and "teacher_response" not in train_rows.column_names
    ):
        raise ConfigError(
            f"rollout.guidance with prefix_source='data' needs a teacher response column "
            f"{columns.teacher_response!r} (data.teacher_response_column) or conversations whose last turn is the "
            f"assistant's; data.path has {train_rows.column_names} (set rollout.prefix_source=teacher or "
            "rollout.guidance=false)"
        )
    check_run_shapes(cfg, world or int(os.environ.get("WORLD_SIZE", "1")))
    check_lr_schedule(cfg.optim)
    if tokenizer is not None:
        d = cfg.data
        warnings = check_template_kwargs(tokenizer, d.chat_template_kwargs)
        options = dict(template_kwargs=d.chat_template_kwargs, columns=columns)
        warnings += check_rows(
            train_rows, tokenizer, "data.path", d.max_prompt_tokens, d.long_prompts, d.chat_template, **options
        )
        if eval_rows is not None:
            warnings += check_rows(
                eval_rows, tokenizer, "data.eval_path", d.max_prompt_tokens, d.long_prompts, d.chat_template, True,
                **options,
            )  # fmt: skip
        if os.environ.get("RANK", "0") == "0":
            for line in warnings:
                print(f"[tropd-ds] {line}", flush=True)
    check_positions(cfg)
    return Prepared(tokenizer, n_tokens, train_rows, eval_rows, objective)


def check_positions(cfg: RunConfig) -> None:
    """A prompt of data.max_prompt_tokens plus the longest response must fit each model's positions."""
    from transformers import AutoConfig

    longest = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    for role, model in (("student", cfg.student), ("teacher", cfg.teacher)):
        try:
            config = AutoConfig.from_pretrained(model.path)
        except Exception:  # checked (and reported) by the model-folder checks; a dry run may have only a config
            continue
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text, "max_position_embeddings", None)
        if isinstance(positions, int) and longest > positions:
            raise ConfigError(
                f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} plus max_new_tokens "
                f"(rollout {cfg.rollout.max_new_tokens}, eval {cfg.eval.max_new_tokens}) is {longest} tokens, more "
                f"than the {role}'s {positions} positions (max_position_embeddings in {model.path}): lower them so "
                f"that the sum is at most {positions}"
            )


def check_objective(cfg: RunConfig, n_tokens: int) -> Objective:
    try:
        objective = loss_fn(cfg.objective.name, **cfg.objective.options)
    except ValueError as exc:
        raise ConfigError(f"objective: {exc}") from exc
    ppo_clip = getattr(objective.options, "ppo_clip", None)
    if ppo_clip is not None:
        raise ConfigError(
            f"objective.options.ppo_clip={ppo_clip}: the trainer makes one update per rollout batch, where the ratio "
            "to the sampling policy is 1 and the clip never acts (several updates per batch are not implemented); "
            "remove ppo_clip. Callers of tropd_ds.objectives.loss_fn that keep the rollout's log-probs can still "
            "pass it with old_logprob"
        )
    if objective.max_k() > n_tokens:
        key = "k" if objective.options.k >= objective.max_k() else "k_end"
        raise ConfigError(
            f"objective.options.{key}={objective.max_k()} exceeds the vocabulary ({n_tokens} tokens): expected at "
            f"most {n_tokens}"
        )
    return objective


def has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def check_run_shapes(cfg: RunConfig, world: int) -> None:
    """Batch arithmetic for `world` ranks, and the DeepSpeed configs against the run config."""
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step}: expected a multiple of the {world} ranks"
        )
    rollouts_per_rank = cfg.rollout.prompts_per_step // world * cfg.rollout.samples_per_prompt
    if rollouts_per_rank % cfg.student.micro_batch_size:
        raise ConfigError(
            f"student.micro_batch_size={cfg.student.micro_batch_size} does not divide the {rollouts_per_rank} rollouts "
            "per rank (rollout.prompts_per_step / ranks x rollout.samples_per_prompt)"
        )
    grad_accum = micro_batches_per_rank(cfg, world)
    student_ds, teacher_ds = read_ds_config(cfg.student.ds_config), read_ds_config(cfg.teacher.ds_config)
    check_ds_config("student", cfg.student, student_ds, cfg.student.micro_batch_size, grad_accum, world, cfg.optim)
    check_ds_config("teacher", cfg.teacher, teacher_ds, cfg.teacher.micro_batch_size, 1, world)


PARITY_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}  # largest |difference| of a log-prob


@torch.no_grad()
def logit_parity(student, teacher, input_ids, attention_mask) -> dict[str, tuple[float, float]]:
    """Per role, (largest, mean) |difference| between each next token's log-prob as tropd-ds computes it
    (the vocabulary kernels on the final hidden states, through the wrapper's forward) and as the
    model's own forward computes it. `student` and `teacher` are the wrapped modules (engine.module):
    every call is a module forward, so ZeRO-3 gathers what each one uses."""
    select = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    targets = input_ids[:, 1:][select]
    teacher_topk = teacher(input_ids, attention_mask, select, 1, 1.0)
    ours = {
        "teacher": teacher_topk.target_logprob,
        "student": student(input_ids, attention_mask, select, teacher_topk, options=tk.KernelOptions()).logprob,
    }
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = {}
    for role, wrapped in (("student", student), ("teacher", teacher)):
        logits = wrapped.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1][
            select
        ]
        theirs = logits[:, : wrapped.n_tokens].float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(1)
        diff = (ours[role].float() - theirs).abs()
        out[role] = (float(diff.max()), float(diff.mean()))
    return out


def check_logit_parity(cfg: RunConfig, student, teacher, rows, tokenizer, device, log) -> bool:
    """Before the first step: on the first training row (its prompt and teacher response, at most 64
    tokens, the same on every rank), tropd-ds's log-probs must equal each model's own forward's. A
    model whose logits the package does not reproduce (an unhandled logit transform) stops the run here
    with the figures, instead of training against the wrong distribution."""
    encode = lambda i: encode_prompt(
        tokenizer, rows[i], i, cfg.data.max_prompt_tokens, cfg.data.long_prompts, cfg.data.chat_template,
        cfg.data.chat_template_kwargs,
    )  # noqa: E731  # fmt: skip
    row = encode(0) or encode(len(rows) - 1)
    ids = (row.ids + (row.response_ids or []))[:64] if row is not None else []
    if len(ids) < 2:
        return True
    input_ids = torch.tensor([ids], device=device)
    found = logit_parity(student.module, teacher.module, input_ids, torch.ones_like(input_ids))
    ok = True
    for role, model_cfg in (("student", cfg.student), ("teacher", cfg.teacher)):
        worst = float(collectives.all_reduce([found[role][0]], op="max")[0])
        tolerance = PARITY_TOLERANCE[model_cfg.dtype]
        if worst > tolerance:
            ok = False
            log(
                f"error: {role} log-probs from the vocabulary kernels differ from the model's own forward by up to "
                f"{worst:.3g} (mean {found[role][1]:.3g}; accepted at {model_cfg.dtype}: {tolerance:g}) on "
                f"{len(ids) - 1} "
                f"tokens of the first training row: {model_cfg.path} transforms its logits in a way tropd-ds does not "
                "reproduce (soft-capping, scaling, a custom head). Training would follow another distribution than the "
                "model's; stopping before step 1."
            )
    return ok
