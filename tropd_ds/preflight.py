"""Pre-flight checks: everything that can be found wrong before a minute of compute is spent.

`validate_before_engines` checks files, data columns, vocabulary, objective options and the batch
arithmetic without any device; `check_logit_parity` runs once the engines exist, before step 1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import tropd_kernels as tk

from . import collectives, process
from .config import ConfigError, RunConfig, micro_batches_per_rank, read_ds_config, teacher_sections
from .data import Columns, check_rows, check_template_kwargs, encode_prompt, load_rows, shared_prompts, teacher_routes
from .engines import check_ds_config, check_lr_schedule
from .extras import require
from .models import check_logit_transforms, load_tokenizers_and_check, vocab_from_configs
from .objectives import Objective, loss_fn


class Prepared(NamedTuple):
    """What the checks loaded, handed to the run: the shared tokenizer (None in a dry run on config-only
    folders), the vocabulary size, the data sets and the objective."""

    tokenizer: object
    n_tokens: int
    train_rows: object
    eval_rows: object
    objective: Objective
    routes: list | None = None  # each training row's teacher (an index into the run's teachers); None: one teacher


def validate_before_engines(cfg: RunConfig, world: int | None = None, dry_run: bool = False) -> Prepared:
    """Everything that can be checked without a device: files, columns, rows, vocabulary, batch shapes.

    With `dry_run`, model folders may hold only config.json (no weights, no tokenizer): the
    vocabulary then comes from the configs and the tokenizer is None."""
    local = [(role, t) for role, t in teacher_sections(cfg) if not t.url]  # served ones: checked against the service
    if dry_run and not all(has_tokenizer(m.path) for m in [cfg.student] + [t for _, t in local]):
        tokenizer, n_tokens = None, vocab_from_configs(cfg.student, local)
    else:
        tokenizer, n_tokens = load_tokenizers_and_check(cfg.student, local, weights=not dry_run)
    if cfg.student.lora:
        from .lora import check as check_lora

        check_lora(cfg.student.path, cfg.student.lora)
    check_logit_transforms(cfg.student.path, "student")
    for role, t in local:
        check_logit_transforms(t.path, role)
    columns = Columns.of(cfg.data)
    train_rows = load_rows(cfg.data.path, cfg.data.split, "data.path", columns)
    routes = teacher_routes(train_rows, cfg.data.teacher_column, list(cfg.teachers)) if cfg.teachers else None
    eval_rows = None
    if cfg.data.eval_path:
        eval_rows = load_rows(
            cfg.data.eval_path, cfg.data.eval_split or None, "data.eval_path", columns, "data.eval_split"
        )
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
    check_teacher_prefixes(cfg)
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
            shared = shared_prompts(train_rows, eval_rows)
            if shared:
                warnings.append(
                    f"warning: {shared} of the {len(eval_rows)} held-out prompts (data.eval_path) are also training "
                    "prompts (data.path): accuracy on them is not held-out accuracy; remove them from one of the sets"
                )
            warnings += check_rows(
                eval_rows, tokenizer, "data.eval_path", d.max_prompt_tokens, d.long_prompts, d.chat_template, True,
                **options,
            )  # fmt: skip
        for line in warnings:
            process.log(line)
    check_positions(cfg)
    return Prepared(tokenizer, n_tokens, train_rows, eval_rows, objective, routes)


def check_teacher_prefixes(cfg: RunConfig) -> None:
    """Prefixes generated by an offloaded teacher that is not gathered are refused: every decoded token would
    fetch each of its layers from host memory (or NVMe) again, about a second per token for a 70B teacher
    over PCIe, hours per step."""
    if not (cfg.rollout.guidance and cfg.rollout.prefix_source == "teacher") or cfg.teacher.gather_params:
        return
    try:
        ds = read_ds_config(cfg.teacher.ds_config)
    except (ConfigError, OSError):
        return  # reported by the model checks, which name the file
    offload = (ds.get("zero_optimization") or {}).get("offload_param") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else "none"
    if device in (None, "none"):
        return
    raise ConfigError(
        f"rollout.prefix_source='teacher' with teacher.gather_params=false and the teacher's parameters offloaded "
        f"(zero_optimization.offload_param.device={device!r} in teacher.ds_config={cfg.teacher.ds_config!r}): the "
        "teacher would generate its prefixes layer by layer, fetching every layer from "
        f"{'host memory' if device == 'cpu' else 'NVMe'} again for every token (about a second per token for a 70B "
        "teacher; hours per step). Accepted: rollout.prefix_source=data (a teacher_response column generated "
        "beforehand, e.g. with vLLM), teacher.gather_params=true (the teacher fits on one device), a teacher.ds_config "
        "without offload_param, or rollout.guidance=false"
    )


def check_positions(cfg: RunConfig) -> None:
    """A prompt of data.max_prompt_tokens plus the longest response must fit each model's positions."""
    from transformers import AutoConfig

    longest = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    for role, model in [("student", cfg.student), *teacher_sections(cfg)]:
        if not model.path:  # a served teacher: its service refuses rows longer than its positions
            continue
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
    student_ds = read_ds_config(cfg.student.ds_config)
    check_ds_config("student", cfg.student, student_ds, cfg.student.micro_batch_size, grad_accum, world, cfg.optim)
    for role, t in teacher_sections(cfg):
        if not t.url:
            check_ds_config(role, t, read_ds_config(t.ds_config), t.micro_batch_size, 1, world)


PARITY_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}  # largest |difference| of a log-prob


@torch.no_grad()
def logit_parity(student, teacher, input_ids, attention_mask) -> dict[str, tuple[float, float]]:
    """Per role, (largest, mean) |difference| between each next token's log-prob as tropd-ds computes it
    (the vocabulary kernels on the final hidden states, through the wrapper's forward) and as the
    model's own forward computes it. `student` and `teacher` are the wrapped modules (engine.module):
    every call is a module forward, so ZeRO-3 gathers what each one uses."""
    select = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    teacher_topk = teacher(input_ids, attention_mask, select, 1, 1.0)
    ours = {
        "teacher": teacher_topk.target_logprob,
        "student": student(input_ids, attention_mask, select, teacher_topk, options=tk.KernelOptions()).logprob,
    }
    wrapped = {"student": student, "teacher": teacher}
    return {role: _against_own_forward(wrapped[role], ours[role], input_ids, attention_mask) for role in wrapped}


@torch.no_grad()
def model_parity(teacher, input_ids, attention_mask) -> tuple[float, float]:
    """The teacher's half of `logit_parity` (the teacher service answers it for a trainer)."""
    select = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    ours = teacher(input_ids, attention_mask, select, 1, 1.0).target_logprob
    return _against_own_forward(teacher, ours, input_ids, attention_mask)


@torch.no_grad()
def served_logit_parity(student, remote, input_ids, attention_mask) -> dict[str, tuple[float, float]]:
    """`logit_parity` with a served teacher: its top-1 from the service feeds the student's forward, and the
    service compares the teacher's log-probs with its model's own forward."""
    from .objectives import StepOptions
    from .rollout import RolloutTokens

    select = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    tokens = RolloutTokens(input_ids, attention_mask, select, torch.zeros_like(select))
    (teacher_topk,) = remote.score(tokens, StepOptions(1, tk.KernelOptions()), input_ids.shape[0])
    ours = student(input_ids, attention_mask, select, teacher_topk, options=tk.KernelOptions()).logprob
    mine = _against_own_forward(student, ours, input_ids, attention_mask)
    return {"student": mine, "teacher": remote.parity(input_ids)}


def _against_own_forward(wrapped, ours, input_ids, attention_mask) -> tuple[float, float]:
    select = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    targets = input_ids[:, 1:][select]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = wrapped.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1]
    theirs = logits[select][:, : wrapped.n_tokens].float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(1)
    diff = (ours.float() - theirs).abs()
    return float(diff.max()), float(diff.mean())


def check_logit_parity(
    cfg: RunConfig,
    student,
    teacher,
    rows,
    tokenizer,
    device,
    log,
    role: str = "teacher",
    teacher_cfg=None,
    student_too: bool = True,
) -> bool:
    """Before the first step: on the first training row (its prompt and teacher response, at most 64
    tokens, the same on every rank), tropd-ds's log-probs must equal each model's own forward's. A
    model whose logits the package does not reproduce (an unhandled logit transform) stops the run here
    with the figures, instead of training against the wrong distribution. With several teachers it runs once
    per teacher (`role`, `teacher_cfg`: its key and section), the student's side judged the first time only."""
    teacher_cfg = teacher_cfg if teacher_cfg is not None else cfg.teacher
    encode = lambda i: encode_prompt(
        tokenizer, rows[i], i, cfg.data.max_prompt_tokens, cfg.data.long_prompts, cfg.data.chat_template,
        cfg.data.chat_template_kwargs,
    )  # noqa: E731  # fmt: skip
    row = encode(0) or encode(len(rows) - 1)
    ids = (row.ids + (row.response_ids or []))[:64] if row is not None else []
    if len(ids) < 2:
        return True
    input_ids = torch.tensor([ids], device=device)
    served = getattr(teacher, "served", None)  # a teacher_client.RemoteTeacher: the service checks its side
    if served is None:
        found = logit_parity(student.module, teacher.module, input_ids, torch.ones_like(input_ids))
    else:
        found = served_logit_parity(student.module, teacher, input_ids, torch.ones_like(input_ids))
    ok = True
    for side, key, model_cfg in (("student", "student", cfg.student), ("teacher", role, teacher_cfg)):
        worst = float(collectives.all_reduce([found[side][0]], op="max")[0])
        if side == "student" and not student_too:
            continue
        dtype = served["dtype"] if served is not None and side == "teacher" else model_cfg.dtype
        tolerance = PARITY_TOLERANCE[dtype]
        name = served["model"] if served is not None and side == "teacher" else model_cfg.path
        if worst > tolerance:
            ok = False
            log(
                f"error: {key} log-probs from the vocabulary kernels differ from the model's own forward by up to "
                f"{worst:.3g} (mean {found[side][1]:.3g}; accepted at {dtype}: {tolerance:g}) on "
                f"{len(ids) - 1} "
                f"tokens of the first training row: {name} transforms its logits in a way "
                "tropd-ds does not reproduce (soft-capping, scaling, a custom head). Training would follow another "
                "distribution than the model's; stopping before step 1."
            )
    return ok
