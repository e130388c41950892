"""Every objective's update through the trainer's `update.update` on 2 CPU ranks x 2 micro-batches under
ZeRO-3, one SGD step each from the same weights; rank 0 writes the updated parameters per objective.

Launched by tests/zero3_workers.py (conftest's `zero3_results`); tests/test_global_batch.py's `reference` runs
the 8 rows as one batch in one process."""

from __future__ import annotations

import json
import sys

import torch
import tropd_kernels as tk

from tropd_ds.config import StudentConfig
from tropd_ds.objectives import loss_fn
from tropd_ds.process import exit_without_teardown
from tropd_ds.rollout import RolloutTokens

ROWS, MB, SEQ, K, LR = 4, 2, 12, 4, 0.5
# (run name, objective, options, step, total steps):
# reopold at step 0 is its r-based stage, at step 1 of 1 its entropy stage
RUNS = [
    ("opd", "opd", {}, 0, 1),
    ("tropd", "tropd", {"trust_mode": "expected", "beta": 0.1, "k": K}, 0, 1),
    ("mask_outlier", "mask_outlier", {}, 0, 1),
    ("clip_outlier", "clip_outlier", {}, 0, 1),
    ("reopold_stage1", "reopold", {}, 0, 1),
    ("reopold_stage2", "reopold", {}, 1, 1),
    ("entropy_opd", "entropy_opd", {}, 0, 1),
    ("eopd", "eopd", {"k": K}, 0, 1),
    ("fkl_topk", "fkl_topk", {"k": K}, 0, 1),
    ("jsd", "jsd", {"k": K}, 0, 1),
]


def rank_batch(rank: int, vocab: int):
    """This rank's 4 rows: ids, masks (a left pad, a prefix, sampled tokens) and the teacher's top-k."""
    g = torch.Generator().manual_seed(50 + rank)
    ids = torch.randint(3, vocab, (ROWS, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    prefix = torch.zeros(ROWS, SEQ - 1, dtype=torch.bool)
    prefix[1, 3:5] = True
    sampled = torch.zeros(ROWS, SEQ - 1, dtype=torch.bool)
    sampled[:, 5:] = True
    sampled[2, 9:] = False  # a shorter response
    if rank == 1:  # unequal token counts across ranks: a mean over this rank's tokens x ranks would be wrong
        sampled[3, 7:] = False
    select = sampled | prefix
    teachers = []
    for start in range(0, ROWS, MB):
        targets = ids[start : start + MB, 1:][select[start : start + MB]]
        teachers.append(tk.teacher_topk(torch.randn(len(targets), vocab, generator=g) * 3, targets, K))
    return RolloutTokens(ids, mask, sampled, prefix), teachers


def main(model_dir: str, out_path: str) -> None:
    import deepspeed

    from tropd_ds import collectives, update
    from tropd_ds.models import load_causal_lm
    from tropd_ds.update import StudentTerms

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = collectives.rank_world()
    config = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": ROWS // MB,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "memory_efficient_linear": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,
    }
    results = {}
    for name, objective_name, options, step, total in RUNS:
        lm, _keep = load_causal_lm(StudentConfig(path=model_dir), config)
        model = StudentTerms(lm, lm.config.vocab_size)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
        )
        tokens, teachers = rank_batch(rank, lm.config.vocab_size)
        objective = loss_fn(objective_name, **options)
        options_at_step = objective.step_options(step, total, 1.0)
        update.update(
            engine, objective, tokens, teachers, MB, step, total, options_at_step, torch.Generator().manual_seed(0)
        )
        params = {}
        for pname, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                params[pname] = p.detach().clone().tolist()
        results[name] = params
        engine.destroy()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1])
    torch.distributed.destroy_process_group()
    exit_without_teardown(0)
