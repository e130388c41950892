"""Teacher scoring: the teacher's forward over every rollout, reduced at once to a TeacherTopK per
response token (sampled or prefix). Teacher logits never exist beyond one chunk of tokens.

`TeacherScorer` is the teacher's forward (a frozen ZeRO-3 engine wraps it); `score` runs it in the
teacher's own micro-batches and hands the update one TeacherTopK per student micro-batch."""

from __future__ import annotations

import contextlib

import torch
import tropd_kernels as tk

from . import collectives
from .config import TeacherConfig
from .engines import initialize, teacher_ds_config
from .models import VocabHeadModel, load_causal_lm
from .objectives import StepOptions
from .rollout import RolloutTokens
from .zero3 import hook_free_gathered, zero3_offload


class TeacherScorer(VocabHeadModel):
    """forward(input_ids, attention_mask, select [B, T-1] bool, k, temperature) -> the TeacherTopK of the
    selected targets. TeacherTopK is a NamedTuple: DeepSpeed's ZeRO-3 hooks rebuild NamedTuples that cross
    a module boundary (a dataclass would pass through without its tensors being seen)."""

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, select, k: int, temperature: float) -> tk.TeacherTopK:
        hidden = self.hidden_states(input_ids, attention_mask)[select]
        targets = input_ids[:, 1:][select]
        weight, bias = self.head()
        return tk.teacher_topk_from_hidden(hidden, weight, targets, k, temperature, bias, vocab=self.n_tokens)


def teacher_engine(cfg: TeacherConfig, n_tokens: int):
    """A ZeRO-3 inference engine (no optimiser) with parameters offloaded as its config says; returns
    the engine and the HfDeepSpeedConfig that must outlive the model's loading."""
    ds_config = teacher_ds_config(cfg)
    lm, keep = load_causal_lm(cfg, ds_config)
    lm.requires_grad_(False)
    lm.eval()
    return initialize(TeacherScorer(lm, n_tokens), ds_config), keep


@torch.no_grad()
def score(
    teacher,
    tokens: RolloutTokens,
    options: StepOptions,
    micro_batch: int,
    student_micro_batch: int,
    gather: bool = False,
    trim: bool = True,
) -> list[tk.TeacherTopK]:
    """The teacher's TeacherTopK (top `options.k`) of every response target, run `micro_batch` rollouts at a
    time and returned per student micro-batch of `student_micro_batch` rollouts (in row order), as the update
    consumes it.

    `gather`: the whole teacher is gathered once for all micro-batches and run without ZeRO-3's
    per-module hooks (teacher.gather_params); otherwise ZeRO-3 gathers it layer by layer. The teacher's
    micro-batches group rollouts of like length and, with `trim`, leave out the columns that are padding in
    every row of one (`trim=False`: every micro-batch at the full width, in row order, for comparisons)."""
    order, batches = teacher_batches(tokens, micro_batch, trim)
    parts = []
    with gathered(teacher, gather):
        for rows in batches:
            parts.append(
                teacher(rows.input_ids, rows.attention_mask, rows.targets, options.k, options.kernel.temperature)
            )
    if micro_batch == student_micro_batch and order is None:
        return parts
    joined = in_row_order(parts, tokens, order)
    counts = [int(rows.targets.sum()) for rows in tokens.micro_batches(student_micro_batch, trim=False)]
    return [tk.TeacherTopK(*fields) for fields in zip(*(torch.split(t, counts) for t in joined))]


def gathered(teacher, gather: bool):
    """The whole teacher gathered once, ZeRO-3's per-module hooks off (teacher.gather_params), or nothing."""
    if gather and zero3_offload(teacher) is not None:
        return hook_free_gathered(teacher)
    return contextlib.nullcontext()


def teacher_batches(tokens: RolloutTokens, micro_batch: int, trim: bool = True):
    """The teacher's micro-batches of `tokens` and the row order they follow (None: the rows' own). Rollouts of
    like length share a micro-batch (fewer pad columns to score); the teacher's results do not depend on the
    company a row keeps but in the last bits of float rounding, so the in-job teacher and the teacher service
    batch alike through this one function."""
    grouped = trim and micro_batch < tokens.input_ids.shape[0]
    order = torch.argsort(tokens.attention_mask.sum(1), descending=True, stable=True) if grouped else None
    ordered = tokens.select(order) if grouped else tokens
    return order, ordered.micro_batches(micro_batch, trim)


def in_row_order(parts: list, tokens: RolloutTokens, order) -> list[torch.Tensor]:
    """The fields of the micro-batches' TeacherTopKs joined, in the rows' own order (row-major targets)."""
    joined = [torch.cat(field) for field in zip(*parts)]
    if order is None:
        return joined
    per_row = [torch.split(t, tokens.targets[order].sum(1).tolist()) for t in joined]
    back = torch.argsort(order).tolist()
    return [torch.cat([rows[i] for i in back]) for rows in per_row]


# ----------------------------------------------------------------------------- several teachers (teachers:)


def empty_topk(k: int, device) -> tk.TeacherTopK:
    """The TeacherTopK of no targets (a rank none of whose rows a teacher scores)."""
    return tk.TeacherTopK(
        torch.zeros((0, k), dtype=torch.long, device=device),
        torch.zeros((0, k), dtype=torch.float32, device=device),
        torch.zeros(0, dtype=torch.float32, device=device),
        torch.zeros(0, dtype=torch.float32, device=device),
    )


@torch.no_grad()
def score_rows(
    teacher, tokens: RolloutTokens, rows: torch.Tensor, options: StepOptions, micro_batch: int, gather: bool
) -> tk.TeacherTopK:
    """An in-job teacher's TeacherTopK of the targets of `rows` (row indices, ascending), row-major, batched as
    `score` batches. Every rank runs the same number of the teacher's forwards (a ZeRO-3 forward is a
    collective): the ranks agree on the most micro-batches any of them has, and a rank with fewer runs its first
    row again for each one it lacks, its answer dropped. A collective: every rank calls it for every teacher."""
    mine = tokens.select(rows.to(tokens.input_ids.device)) if len(rows) else None
    order, batches = teacher_batches(mine, micro_batch) if mine is not None else (None, [])
    needed = len(batches)
    if collectives.rank_world()[1] > 1:
        needed = int(collectives.all_reduce([float(needed)], op="max")[0])
    parts = []
    if needed:
        with gathered(teacher, gather):
            for i in range(needed):
                batch = batches[i] if i < len(batches) else tokens.rows(0, 1)
                found = teacher(
                    batch.input_ids, batch.attention_mask, batch.targets, options.k, options.kernel.temperature
                )
                if i < len(batches):
                    parts.append(found)
    if not parts:
        return empty_topk(options.k, tokens.input_ids.device)
    return tk.TeacherTopK(*in_row_order(parts, mine, order))


def merge_routed(answers: dict, tokens: RolloutTokens, route: torch.Tensor, student_micro_batch: int):
    """One TeacherTopK per student micro-batch from each teacher's answer for its own rows: `answers[j]` holds the
    targets of the rows with route == j (ascending rows, row-major), `route` [B] each row's teacher."""
    per_row_counts = tokens.targets.sum(1).cpu()
    pieces = {}
    for j, answer in answers.items():
        counts = per_row_counts[route == j].tolist()
        pieces[j] = [torch.split(field, counts) for field in answer]
    taken = dict.fromkeys(answers, 0)
    rows = []
    for j in route.tolist():
        rows.append([field[taken[j]] for field in pieces[j]])
        taken[j] += 1
    joined = [torch.cat(field) for field in zip(*rows)]
    counts = [int(r.targets.sum()) for r in tokens.micro_batches(student_micro_batch, trim=False)]
    return [tk.TeacherTopK(*fields) for fields in zip(*(torch.split(t, counts) for t in joined))]
