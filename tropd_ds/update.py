"""Student update: kernels on the student's final hidden states, the objective, backward and step."""

from __future__ import annotations

import torch
import torch.distributed as dist
import tropd_kernels as tk

from . import faults
from .rollout import RolloutTokens


def update(
    engine,
    objective,
    rollout: RolloutTokens,
    teachers: list[tk.TeacherTopK],
    micro_batch: int,
    step: int,
    total_steps: int,
    temperature: float,
    token_count: float,
    generator: torch.Generator,
) -> list[dict]:
    """One optimiser step over this rank's rollouts, `micro_batch` rows at a time.

    `token_count` is the global number of response tokens divided by (ranks x micro-batches), the
    factor DeepSpeed's gradient averaging undoes, so the step follows the global token mean."""
    opts = objective.kernel_options(step, total_steps)
    opts.pop("k")
    select_all = rollout.sampled | rollout.prefix
    metrics = []
    for i, start in enumerate(range(0, rollout.input_ids.shape[0], micro_batch)):
        rows = slice(start, start + micro_batch)
        select = select_all[rows]
        teacher = teachers[i]
        fields = engine(
            rollout.input_ids[rows], rollout.attention_mask[rows], select, *teacher, temperature, opts["fkl_mode"], opts["logprob_floor"], opts["fkl_cover"]
        )
        terms = tk.TokenTerms(*fields)
        out = objective(terms, teacher, rollout.sampled[rows][select], rollout.prefix[rows][select], step, total_steps, generator, token_count=token_count)
        if faults.active("nan_loss", step + 1, dist.get_rank() if dist.is_initialized() else 0):
            out.loss = out.loss * float("nan")
            out.metrics["loss"] = float("nan")
        engine.backward(out.loss)
        engine.step()
        metrics.append(out.metrics)
    return metrics
