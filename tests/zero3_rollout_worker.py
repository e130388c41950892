"""Rollouts from a ZeRO-3 student on 2 CPU ranks, then one update, then a second rollout with the first
one's seed, twice from the same weights and seed: hook-free (gathered once, ZeRO-3's module hooks removed
while generating) and hooked (layer by layer, hooks never touched); for a student biased towards pad and a
plain one. Then a ZeRO-3 teacher scores the plain student's rollouts gathered (hook-free) and layer by layer.
Rank 0 writes every run's tokens, masks, counts, updated parameters and the two scorings.

Launched by tests/zero3_workers.py (conftest's `zero3_results`), last: it ends the process group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import tropd_kernels as tk
from deepspeed.runtime.rollout import SamplingConfig

from tropd_ds import rollout, update, zero3
from tropd_ds.config import OptimConfig, StudentConfig
from tropd_ds.data import Prompt
from tropd_ds.demo_task import build_tokenizer
from tropd_ds.objectives import loss_fn
from tropd_ds.process import exit_without_teardown
from tropd_ds.update import student_engine

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ("3+4=", "12-5+1=", "9=", "1+1+1+1+1=", "7-2=", "8-8=", "5+5=", "6=")
MB, NEW = 4, 16


def one_run(model_dir: str, gather: bool, rank: int, world: int) -> dict:
    tok = build_tokenizer()
    cfg = StudentConfig(path=model_dir, ds_config=str(ROOT / "ds_configs/cpu_student_zero3.json"), micro_batch_size=MB)
    engine, _keep = student_engine(cfg, OptimConfig(lr=1e-2, steps=1), len(tok), MB, 1)
    offload = zero3.zero3_offload(engine)
    hooks = lambda: [
        (m.ds_id, list(m._forward_pre_hooks.items()), list(m._forward_hooks.items())) for m in engine.module.modules()
    ]  # noqa: E731
    before = hooks()
    calls = []
    original = offload.pre_sub_module_forward_function
    offload.pre_sub_module_forward_function = lambda module: (calls.append(1), original(module))[1]
    ro = rollout.GenerateRollout(engine, tok.pad_token_id, rollout.end_token_ids(tok, engine.module.lm), gather=gather)
    prompts = [Prompt(i, tok(TEXTS[(rank * MB + i) % len(TEXTS)])["input_ids"], None, None) for i in range(MB)]
    torch.manual_seed(100 + rank)
    engine.eval()
    tokens = rollout.sample(ro, prompts, [[]] * MB, SamplingConfig(max_new_tokens=NEW), torch.device("cpu"))
    after = hooks()
    offload.pre_sub_module_forward_function = original
    # the same draws when the loop asks whether every row ended only every 5 tokens (on 2 ranks decoding
    # layer by layer, the ranks agree at each check)
    sparse = rollout.GenerateRollout(engine, tok.pad_token_id, ro.end_ids, gather=gather, check_every=5)
    torch.manual_seed(100 + rank)
    checked = rollout.sample(sparse, prompts, [[]] * MB, SamplingConfig(max_new_tokens=NEW), torch.device("cpu"))
    same_every_5 = all(torch.equal(getattr(checked, f), getattr(tokens, f)) for f in ("input_ids", "attention_mask"))
    # and with transformers' DynamicCache in place of the preallocated one (the default)
    dynamic = rollout.GenerateRollout(engine, tok.pad_token_id, ro.end_ids, gather=gather, preallocate=False)
    torch.manual_seed(100 + rank)
    copied = rollout.sample(dynamic, prompts, [[]] * MB, SamplingConfig(max_new_tokens=NEW), torch.device("cpu"))
    same_dynamic = all(torch.equal(getattr(copied, f), getattr(tokens, f)) for f in ("input_ids", "attention_mask"))
    targets = tokens.input_ids[:, 1:][tokens.sampled]
    teacher = tk.teacher_topk(
        torch.randn(len(targets), len(tok), generator=torch.Generator().manual_seed(rank)) * 2, targets, 4
    )
    objective = loss_fn("tropd", trust_mode="expected", k=4, beta=0.1)
    options = objective.step_options(0, 1, 1.0)
    metrics = update.update(engine, objective, tokens, [teacher], MB, 0, 1, options, torch.Generator().manual_seed(0))
    torch.manual_seed(100 + rank)  # the first rollout's seed: only the update can make this one differ
    engine.eval()
    again = rollout.sample(ro, prompts, [[]] * MB, SamplingConfig(max_new_tokens=NEW), torch.device("cpu"))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {name: p.detach().clone().tolist() for name, p in engine.module.named_parameters()}
    return {
        "input_ids": tokens.input_ids.tolist(),
        "attention_mask": tokens.attention_mask.tolist(),
        "sampled": tokens.sampled.tolist(),
        "after_update": again.input_ids.tolist(),
        "tokens": tokens,
        "loss_sampled_tokens": sum(m["sampled_tokens"] for m in metrics),
        "hooks_restored": before == after,
        "hooks": sum(len(pre) + len(post) for _, pre, post in before),
        "hook_calls_while_generating": len(calls),
        "same_when_checked_every_5_tokens": same_every_5,
        "same_with_dynamic_cache": same_dynamic,
        "params": params,
    }


def scorings(model_dir: str, tokens) -> dict:
    """The teacher's TeacherTopK of `tokens`, gathered once without hooks and layer by layer."""
    from tropd_ds import scoring
    from tropd_ds.objectives import StepOptions

    cfg = StudentConfig(
        path=model_dir, ds_config=str(ROOT / "ds_configs/cpu_teacher_zero3_offload.json"), micro_batch_size=2
    )
    teacher, _keep = scoring.teacher_engine(cfg, len(build_tokenizer()))
    options = StepOptions(4, tk.KernelOptions(1.0))
    out = {}
    for name, gather in (("hook_free", True), ("hooked", False)):
        parts = scoring.score(teacher, tokens, options, 2, MB, gather)
        out[name] = [[t.tolist() for t in part] for part in parts]
    return out


def main(model_dir: str, plain_dir: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    runs = {"hook_free": one_run(model_dir, True, rank, world), "hooked": one_run(model_dir, False, rank, world)}
    plain = {"hook_free": one_run(plain_dir, True, rank, world), "hooked": one_run(plain_dir, False, rank, world)}
    scored = scorings(plain_dir, plain["hooked"]["tokens"])
    gathered = [None] * world
    dist.all_gather_object(
        gathered,
        {
            k: {
                f: v[f]
                for f in (
                    "input_ids",
                    "attention_mask",
                    "sampled",
                    "after_update",
                    "loss_sampled_tokens",
                    "hooks_restored",
                    "hooks",
                    "hook_calls_while_generating",
                    "same_when_checked_every_5_tokens",
                    "same_with_dynamic_cache",
                )
            }
            for k, v in runs.items()
        }
        | {
            "plain": {k: {f: v[f] for f in ("input_ids", "after_update")} for k, v in plain.items()},
            "scoring": scored,
        },
    )
    if rank == 0:
        params = {k: v["params"] for k, v in runs.items()}
        Path(out).write_text(json.dumps({"ranks": gathered, "params": params}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], args[2])
    exit_without_teardown(0)
