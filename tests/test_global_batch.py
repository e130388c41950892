"""Batch statistics are global: for every objective of docs/METHOD.md, an update over 2 ranks x
2 micro-batches under ZeRO-3 (the real launcher) equals one process's update over the whole batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import global_batch_worker as worker  # noqa: E402


def reference(model_dir: str, objective_name: str, options: dict, step: int, total: int) -> dict:
    import tropd_kernels as tk
    from transformers import AutoModelForCausalLM

    from tropd_ds.objectives import loss_fn
    from tropd_ds.update import StudentTerms

    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    model = StudentTerms(lm, lm.config.vocab_size)
    opt = torch.optim.SGD(model.parameters(), lr=worker.LR)
    batches = [worker.rank_batch(r, lm.config.vocab_size) for r in range(2)]
    ids = torch.cat([b[0].input_ids for b in batches])
    mask = torch.cat([b[0].attention_mask for b in batches])
    sampled = torch.cat([b[0].sampled for b in batches])
    prefix = torch.cat([b[0].prefix for b in batches])
    teacher = tk.TeacherTopK(*(torch.cat(x) for x in zip(*[t for b in batches for t in b[1]])))
    select = sampled | prefix
    objective = loss_fn(objective_name, **options)
    opts = objective.step_options(step, total, 1.0)
    terms = model(ids, mask, select, teacher, options=opts.kernel)
    loss = objective(
        terms, teacher, sampled[select], prefix[select], step, total, torch.Generator().manual_seed(0)
    ).loss
    loss.backward()
    opt.step()
    return {name: p.detach() for name, p in model.named_parameters()}


def test_every_objective_over_ranks_and_micro_batches_equals_one_batch(zero3_results):
    got = json.loads((zero3_results / "updates.json").read_text())  # conftest's one launch of the workers
    bad = []
    for name, objective_name, options, step, total in worker.RUNS:
        want = reference(str(zero3_results / "global_batch_student"), objective_name, options, step, total)
        for pname, p in want.items():
            if not torch.allclose(torch.tensor(got[name][pname]), p, rtol=1e-5, atol=1e-7):
                bad.append(f"{name}: {pname} off by {float((torch.tensor(got[name][pname]) - p).abs().max()):.2e}")
    assert not bad, "\n".join(bad)
