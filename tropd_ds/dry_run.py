"""`tropd-ds train --config run.yaml --dry-run [--world-size N]`: find configuration errors in seconds.

Everything the run would check before its engines start (files, data columns, vocabulary,
objective options, batch arithmetic for N ranks, the DeepSpeed configs against the run config),
then DeepSpeed's own parser on the two engine configs, then both models built on the meta device
(no weights, no memory) and one step's shapes: the rollout's sequences through the student and the
teacher, the hidden states against each lm_head, a [chunk, V] logits block and the teacher's top-k,
and the memory plan for N GPUs. Model folders may hold only config.json (the shipped
configs/models/*): the tokenizer check and prompt tokenization are then reported as skipped.
"""

from __future__ import annotations

import time

import torch

from .config import ConfigError, RunConfig, micro_batches_per_rank, read_ds_config, teacher_sections


def _parse_ds_config(role: str, path: str, ds: dict) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = dict(ds)
    ds.pop("train_batch_size", None)  # batch arithmetic for N ranks is checked by check_run_shapes
    try:
        DeepSpeedConfig(ds)
    except Exception as exc:  # DeepSpeed raises pydantic, assertion and value errors
        raise ConfigError(f"{role}.ds_config={path!r}: DeepSpeed rejects it: {type(exc).__name__}: {exc}") from exc


def _meta_model(role: str, model_cfg, seq: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import DTYPES

    config = AutoConfig.from_pretrained(model_cfg.path)  # its positions were checked by preflight.check_positions
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, dtype=DTYPES[model_cfg.dtype])
    except Exception as exc:
        raise ConfigError(
            f"{role}.path={model_cfg.path!r}: transformers cannot build this model: {type(exc).__name__}: {exc}"
        ) from exc
    return lm


def _shape_step(role: str, lm, batch: int, seq: int, n_tokens: int, k: int) -> dict:
    """One forward at the run's shapes on the meta device, then the vocabulary block and top-k."""
    from tropd_kernels.projection import HIDDEN_CHUNK_BYTES

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    hidden = lm.base_model(input_ids=ids).last_hidden_state[:, :-1]  # causal; padding masks need values
    d = hidden.shape[-1]
    head = lm.get_output_embeddings().weight
    if head.shape[1] != d:
        raise ConfigError(f"{role}: lm_head has {head.shape[1]} input features but the hidden states have {d}")
    if head.shape[0] < n_tokens:
        raise ConfigError(f"{role}: lm_head has {head.shape[0]} rows, fewer than the {n_tokens} vocabulary tokens")
    flat = hidden.reshape(-1, d)
    chunk = max(1, min(flat.shape[0], HIDDEN_CHUNK_BYTES["cuda"] // (4 * n_tokens)))
    logits = flat[:chunk] @ head[:n_tokens].T
    top = logits.float().topk(k, dim=-1)
    assert logits.shape == (chunk, n_tokens) and top.indices.shape == (chunk, k)
    return {
        "hidden": tuple(hidden.shape),
        "positions": flat.shape[0],
        "chunk": chunk,
        "params": sum(p.numel() for p in lm.parameters()),
    }


def dry_run(cfg: RunConfig, world: int, gpu_mem_gib: float = 80.0, gpus_per_node: int = 8) -> list[str]:
    """Run every check; returns the report lines. Raises ConfigError on the first problem."""
    from . import plan as planner
    from .engines import student_ds_config, teacher_ds_config
    from .preflight import validate_before_engines

    t0 = time.perf_counter()
    out = []
    tokenizer, n_tokens, train_rows, eval_rows, objective, routes = validate_before_engines(
        cfg, world=world, dry_run=True
    )
    out.append(
        f"ok  config, files and data: {len(train_rows)} training prompts"
        + (f", {len(eval_rows)} held-out" if eval_rows is not None else "")
        + f"; columns {train_rows.column_names}"
    )
    if routes is not None:
        shares = ", ".join(f"{name} {routes.count(j)}" for j, name in enumerate(cfg.teachers))
        out.append(f"ok  every training prompt names its teacher ({cfg.data.teacher_column}): {shares}")
    if tokenizer is None:
        out.append(
            f"--  tokenizer: none in the model folders; vocabulary taken from the configs ({n_tokens} rows); prompts "
            "not tokenized"
        )
    else:
        from .data import prompt_ids

        d = cfg.data
        lens = [
            len(prompt_ids(tokenizer, train_rows[i]["prompt"], d.chat_template, d.chat_template_kwargs))
            for i in range(min(len(train_rows), 64))
        ]
        longer = sum(n > cfg.data.max_prompt_tokens for n in lens)
        out.append(
            f"ok  tokenizer shared by {'the student and every teacher' if cfg.teachers else 'both models'} "
            f"({n_tokens} tokens); first {len(lens)} prompts: up to {max(lens)} "
            "tokens, "
            f"{longer} longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens} ({cfg.data.long_prompts})"
        )
    fkl_mode = objective.step_options().kernel.fkl_mode
    out.append(f"ok  objective {objective.name}: k {objective.max_k()} <= {n_tokens}, fkl_mode {fkl_mode}")
    rollouts = cfg.rollout.prompts_per_step // world * cfg.rollout.samples_per_prompt
    grad_accum = micro_batches_per_rank(cfg, world)
    out.append(
        f"ok  {world} ranks: {rollouts} rollouts per rank, student micro-batch {cfg.student.micro_batch_size} x "
        f"{grad_accum} accumulation steps, "
        + ", ".join(f"{key} micro-batch {t.micro_batch_size}" for key, t in teacher_sections(cfg))
        + "; DeepSpeed configs agree with the run config"
    )
    _parse_ds_config(
        "student",
        cfg.student.ds_config,
        student_ds_config(cfg.student, cfg.optim, cfg.student.micro_batch_size, grad_accum),
    )
    served = bool(cfg.teacher.url)
    for key, t in teacher_sections(cfg):
        if t.url:
            out.append(f"ok  DeepSpeed parses the student's engine config; the {key} is served at {t.url}")
        else:
            _parse_ds_config(key, t.ds_config, teacher_ds_config(t))
            t_zero = read_ds_config(t.ds_config).get("zero_optimization", {})
            out.append(
                f"ok  DeepSpeed parses the student's and the {key}'s engine configs ({key} "
                f"offload_param={t_zero.get('offload_param', {}).get('device', 'none')})"
            )

    seq = (
        cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    )  # exact: a teacher prefix counts towards max_new_tokens
    k = objective.max_k()
    models = [("student", cfg.student, cfg.student.micro_batch_size)]
    models += [(key, t, t.micro_batch_size) for key, t in teacher_sections(cfg) if not t.url]
    for role, model_cfg, batch in models:
        lm = _meta_model(role, model_cfg, seq)
        shapes = _shape_step(role, lm, batch, seq, n_tokens, k)
        out.append(
            f"ok  {role} on the meta device: {shapes['params'] / 1e9:.2f} B parameters ({model_cfg.dtype}); "
            f"micro-batch {batch} x {seq} tokens -> "
            f"hidden {list(shapes['hidden'])}, {shapes['positions']} positions in [{shapes['chunk']}, {n_tokens}] "
            f"logits blocks, top-{k}"
        )
        del lm
    if cfg.teachers:
        out.append(
            "--  memory plan: not made here for several teachers; `tropd-ds plan --config <this> --teacher <name>` "
            "plans the run with each one"
        )
        out.append(f"dry run finished in {time.perf_counter() - t0:.1f} s: no weights loaded, no engine started")
        return out
    if served:
        out.append(
            "--  memory plan: not made here for a served teacher (its service has hardware of its own); "
            "the service checks the teacher when it starts"
        )
        out.append(f"dry run finished in {time.perf_counter() - t0:.1f} s: no weights loaded, no engine started")
        return out
    s_path, t_path, wl = planner.workload_from_run_config(cfg)
    nodes = max(1, -(-world // gpus_per_node))
    hw = planner.Hardware(gpus_per_node=min(world, gpus_per_node), nodes=nodes, gpu_mem_gib=gpu_mem_gib)
    result = planner.plan(planner.load_arch(s_path), planner.load_arch(t_path), hw, wl)
    g = result["gpu_gib"]
    verdict = "fits" if result["fits"] else "DOES NOT FIT (see `tropd-ds plan --config ...`)"
    out.append(
        f"{'ok' if result['fits'] else '!!'}  memory plan for {hw.gpus} GPUs of {gpu_mem_gib:g} GiB: peak "
        f"{g['total']:.1f} GiB per GPU "
        f"({g['peak_phase']}), host {result['host_gib_per_node']['total']:.1f} GiB per node -> {verdict}; "
        f"estimated step {result['step_seconds']['total']:.0f} s"
    )
    out.append(f"dry run finished in {time.perf_counter() - t0:.1f} s: no weights loaded, no engine started")
    return out
