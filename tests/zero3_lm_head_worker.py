"""One ZeRO-3 training step whose loss comes from token_terms_from_hidden on a partitioned lm_head.

Launched by tests/zero3_workers.py (conftest's `zero3_results`) on 2 CPU ranks (gloo). Each rank
takes its own half of a fixed batch; rank 0 writes the loss and the updated, gathered parameters.
The test runs the same module without DeepSpeed, its loss from the naive oracle, as the reference.
"""

from __future__ import annotations

import json
import sys

import torch
import tropd_kernels as tk
from torch import nn

from tropd_ds.process import exit_without_teardown

VOCAB, DIM, SEQ, K = 97, 16, 11, 8


class TinyStudent(nn.Module):
    """Embedding -> tanh MLP -> lm_head; the loss is computed inside forward, as the trainer does."""

    def __init__(self, oracle: bool = False):
        super().__init__()
        self.oracle = oracle
        self.embed = nn.Embedding(VOCAB, DIM)
        self.body = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, targets, teacher_ids, teacher_logprobs, token_count):
        hidden = torch.tanh(self.body(self.embed(tokens)))
        teacher = tk.TeacherTopK(
            teacher_ids,
            teacher_logprobs,
            torch.zeros_like(targets, dtype=torch.float32),
            torch.zeros_like(targets, dtype=torch.float32),
        )
        if self.oracle:  # the reference: full logits, plain autograd, no DeepSpeed
            terms = tk.token_terms_oracle(hidden @ self.lm_head.weight.t(), targets, teacher, fkl_mode="tail")
        else:
            # lm_head.weight is a partitioned parameter under ZeRO-3: it is gathered for this call
            # (and for its backward) because the call happens inside a module's forward.
            terms = tk.token_terms_from_hidden(
                hidden, self.lm_head.weight, targets, teacher, fkl_mode="tail", chunk_size=4
            )
        return ((terms.fkl - 0.5 * terms.logprob) * (targets != -100)).sum() / token_count


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, VOCAB, (SEQ,), generator=g)
    targets = torch.randint(0, VOCAB, (SEQ,), generator=g)
    targets[3] = -100
    teacher_logits = torch.randn(SEQ, VOCAB, generator=g) * 2
    teacher = tk.teacher_topk(teacher_logits, targets, K)
    return tokens, targets, teacher.ids, teacher.logprobs


def build_model(oracle: bool = False) -> TinyStudent:
    torch.manual_seed(0)
    return TinyStudent(oracle)


def main(out_path: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    model = build_model()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    partitioned = engine.module.lm_head.weight.ds_tensor.numel() < VOCAB * DIM
    tokens, targets, ids, logprobs = batch(rank)
    count = float(sum(int((batch(r)[1] != -100).sum()) for r in range(world))) / world
    loss = engine(tokens, targets, ids, logprobs, count)
    engine.backward(loss)
    engine.step()
    losses = [torch.zeros(1) for _ in range(world)]
    torch.distributed.all_gather(losses, loss.detach().reshape(1))
    params = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            params[name] = p.detach().clone().tolist()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": [float(x) for x in losses], "params": params, "lm_head_partitioned": partitioned}, f)


if __name__ == "__main__":
    main(sys.argv[-1])
    torch.distributed.destroy_process_group()
    exit_without_teardown(0)  # gloo's threads sometimes abort the interpreter's teardown (SIGABRT)
