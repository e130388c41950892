"""Student update: the student's forward to per-token terms (the vocabulary kernels on its final hidden
states), the objective over them, backward and the optimiser step, one micro-batch at a time.

`StudentTerms` is the student's forward (a ZeRO-3 training engine wraps it); `update` runs one step."""

from __future__ import annotations

import contextlib

import torch
import tropd_kernels as tk

from . import collectives, faults, nonfinite
from .config import OptimConfig, StudentConfig
from .engines import initialize, student_ds_config
from .models import VocabHeadModel, load_causal_lm
from .objectives import Objective, StepOptions
from .rollout import RolloutTokens


class StudentTerms(VocabHeadModel):
    """forward(input_ids, attention_mask, select, teacher, options=KernelOptions) -> TokenTerms of the
    selected targets. TeacherTopK in and TokenTerms out are NamedTuples, which DeepSpeed's ZeRO-3 hooks
    rebuild field by field; the options travel as a keyword, which the hooks do not inspect."""

    def forward(
        self, input_ids, attention_mask, select, teacher: tk.TeacherTopK, *, options: tk.KernelOptions
    ) -> tk.TokenTerms:
        hidden = self.hidden_states(input_ids, attention_mask)[select]
        targets = input_ids[:, 1:][select]
        weight, bias = self.head()
        return tk.token_terms_from_hidden(
            hidden, weight, targets, teacher, bias=bias, options=options, vocab=self.n_tokens
        )


def student_engine(
    cfg: StudentConfig,
    optim: OptimConfig,
    n_tokens: int,
    micro_batch: int,
    grad_accum: int,
    logging_dir: str | None = None,
):
    """A ZeRO-3 training engine; returns the engine and the HfDeepSpeedConfig that must outlive the loading.
    Monitors with a relative output_path write under `logging_dir`."""
    ds_config = student_ds_config(cfg, optim, micro_batch, grad_accum, logging_dir)
    lm, keep = load_causal_lm(cfg, ds_config)
    if cfg.lora:  # adapters injected into lm's own modules; the base frozen (and partitioned like the rest)
        from . import lora

        lm = lora.apply(lm, cfg.lora)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = True
    model = StudentTerms(lm, n_tokens)
    model.lora = dict(cfg.lora)  # read by export.export: {} for a fully trained student
    return initialize(model, ds_config, optim), keep


def per_micro_batch(global_value: float, micro_batches: int) -> float:
    """A global count as each micro-batch's loss must divide by it: DeepSpeed averages gradients over the
    ranks and this rank's `micro_batches` micro-batches, so dividing by their number undoes the average and
    the step follows the global token mean."""
    return global_value / (collectives.rank_world()[1] * micro_batches)


def update(
    engine,
    objective: Objective,
    tokens: RolloutTokens,
    teachers: list[tk.TeacherTopK],
    micro_batch: int,
    step: int,
    total_steps: int,
    options: StepOptions,
    generator: torch.Generator,
    route: torch.Tensor | None = None,
    names: tuple = (),
) -> list[dict]:
    """One optimiser step over this rank's rollouts, `micro_batch` rows at a time (`teachers`: one per
    micro-batch, from `scoring.score`); returns each micro-batch's metrics. With several teachers, `route` [B]
    is each row's teacher (an index into `names`) and the metrics gain each teacher's (`teacher_metrics`)."""
    engine.train()
    batches = tokens.micro_batches(micro_batch)
    token_count = per_micro_batch(float(collectives.all_reduce([float(tokens.targets.sum())])[0]), len(batches))
    stats = global_statistics(engine, objective, batches, teachers, step, total_steps, options)
    metrics = []
    trace = nonfinite.tracer(engine, collectives.rank_world()[0])  # None unless TROPD_DS_TRACE_NONFINITE is set
    with trace.watching(step + 1) if trace else contextlib.nullcontext():
        for i, (rows, teacher) in enumerate(zip(batches, teachers)):
            terms = engine(rows.input_ids, rows.attention_mask, rows.targets, teacher, options=options.kernel)
            sampled, prefix = rows.sampled[rows.targets], rows.prefix[rows.targets]
            out = objective(
                terms, teacher, sampled, prefix, step, total_steps, generator, token_count=token_count, **stats
            )
            if faults.active("nan_loss", step + 1, collectives.rank_world()[0]):
                out.loss = out.loss * float("nan")
                out.metrics["loss"] = float("nan")
            engine.backward(out.loss)
            if trace:
                trace.after_backward(engine)
            engine.step()
            if route is not None:
                rows_route = route[i * micro_batch : (i + 1) * micro_batch].to(rows.targets.device)
                target_route = rows_route[:, None].expand_as(rows.targets)[rows.targets]
                out.metrics.update(teacher_metrics(terms, teacher, sampled, out.trust, target_route, names))
            metrics.append(out.metrics)
    return metrics


@torch.no_grad()
def teacher_metrics(terms, teacher, sampled, trust, target_route, names) -> dict[str, float]:
    """Each teacher's share of one micro-batch's metrics, over the sampled tokens of the rows it scored:
    teacher_<name>_ + trust_fraction (TrOPD's mask as the loss drew it), log_ratio_mean / _p1 / _p10 (r_t =
    teacher - student log-prob), fkl_mean, sampled_tokens. A teacher without tokens here has no entry (the step's
    record averages over the micro-batches that have one, as for the run's own metrics)."""
    out = {}
    sampled = sampled.bool()
    for j, name in enumerate(names):
        mine = sampled & (target_route == j)
        count = int(mine.sum())
        if not count:
            continue
        r = (teacher.target_logprob[mine] - terms.logprob.detach()[mine]).float()
        q = torch.quantile(r, torch.tensor([0.01, 0.10], device=r.device)) if count > 1 else r.repeat(2)
        key = f"teacher_{name}_"
        out.update({
            key + "sampled_tokens": float(count),
            key + "log_ratio_mean": float(r.mean()),
            key + "log_ratio_p1": float(q[0]),
            key + "log_ratio_p10": float(q[1]),
            key + "fkl_mean": float(terms.fkl.detach()[mine].mean()),
        })  # fmt: skip
        if trust is not None:
            out[key + "trust_fraction"] = float(trust.detach()[mine].float().mean())
    return out


BATCH_STATISTICS = ("entropy_opd", "reopold")  # objectives that select or normalise by a statistic of the whole batch


@torch.no_grad()
def global_statistics(engine, objective: Objective, batches, teachers, step, total_steps, options: StepOptions) -> dict:
    """`entropy_opd`'s top-fraction entropy threshold and `reopold`'s selection (threshold and count M)
    over the global batch, every micro-batch of every rank, as docs/METHOD.md defines them:
    one gradient-free pass over this rank's micro-batches, the sampled tokens' entropy and log-ratio
    gathered from every rank. The count is taken per micro-batch (`per_micro_batch`), as the token count."""
    if objective.name not in BATCH_STATISTICS:
        return {}
    entropy, log_ratio = [], []
    for rows, teacher in zip(batches, teachers):
        terms = engine.module(rows.input_ids, rows.attention_mask, rows.targets, teacher, options=options.kernel)
        sampled = rows.sampled[rows.targets]
        entropy.append(terms.entropy[sampled].float().cpu())
        log_ratio.append((teacher.target_logprob[sampled] - terms.logprob[sampled]).float().cpu())
    parts = collectives.all_gather_object((torch.cat(entropy), torch.cat(log_ratio)))
    entropy_all = torch.cat([e for e, _ in parts])
    r_all = torch.cat([r for _, r in parts])
    stats = objective.batch_statistics(entropy_all, r_all, torch.ones_like(r_all, dtype=torch.bool), step, total_steps)
    if "selection_count" in stats:
        stats["selection_count"] = per_micro_batch(stats["selection_count"], len(batches))
    return stats
