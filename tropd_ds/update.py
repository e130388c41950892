"""Student update: kernels on the student's final hidden states, the objective, backward and step."""

from __future__ import annotations

import torch
import tropd_kernels as tk

from . import collectives, faults
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
    kernel_args = (temperature, opts["fkl_mode"], opts["logprob_floor"], opts["fkl_cover"])
    starts = list(range(0, rollout.input_ids.shape[0], micro_batch))
    stats = global_statistics(engine, objective, rollout, teachers, starts, micro_batch, step, total_steps, kernel_args)
    metrics = []
    for i, start in enumerate(starts):
        rows = slice(start, start + micro_batch)
        select = select_all[rows]
        teacher = teachers[i]
        fields = engine(rollout.input_ids[rows], rollout.attention_mask[rows], select, *teacher, *kernel_args)
        terms = tk.TokenTerms(*fields)
        sampled, prefix = rollout.sampled[rows][select], rollout.prefix[rows][select]
        out = objective(terms, teacher, sampled, prefix, step, total_steps, generator, token_count=token_count, **stats)
        if faults.active("nan_loss", step + 1, collectives.rank_world()[0]):
            out.loss = out.loss * float("nan")
            out.metrics["loss"] = float("nan")
        engine.backward(out.loss)
        engine.step()
        metrics.append(out.metrics)
    return metrics


BATCH_STATISTICS = ("entropy_opd", "reopold")  # objectives that select or normalise by a statistic of the whole batch


@torch.no_grad()
def global_statistics(engine, objective, rollout: RolloutTokens, teachers, starts, micro_batch, step, total_steps, kernel_args) -> dict:
    """`entropy_opd`'s top-fraction entropy threshold and `reopold`'s selection (threshold and count M)
    over the global batch, every micro-batch of every rank, as ALGORITHM.md section 2 defines them:
    one gradient-free pass over this rank's micro-batches, the sampled tokens' entropy and log-ratio
    gathered from every rank. The count is divided by ranks x micro-batches, the factor DeepSpeed's
    gradient averaging undoes (as for `token_count`)."""
    if objective.name not in BATCH_STATISTICS:
        return {}
    entropy, log_ratio = [], []
    select_all = rollout.sampled | rollout.prefix
    for i, start in enumerate(starts):
        rows = slice(start, start + micro_batch)
        select = select_all[rows]
        terms = tk.TokenTerms(*engine.module(rollout.input_ids[rows], rollout.attention_mask[rows], select, *teachers[i], *kernel_args))
        sampled = rollout.sampled[rows][select]
        entropy.append(terms.entropy[sampled].float().cpu())
        log_ratio.append((teachers[i].target_logprob[sampled] - terms.logprob[sampled]).float().cpu())
    parts = collectives.all_gather_object((torch.cat(entropy), torch.cat(log_ratio)))
    entropy_all = torch.cat([e for e, _ in parts])
    r_all = torch.cat([r for _, r in parts])
    stats = objective.batch_statistics(entropy_all, r_all, torch.ones_like(r_all, dtype=torch.bool), step, total_steps)
    if "selection_count" in stats:
        stats["selection_count"] /= len(parts) * len(starts)
    return stats
