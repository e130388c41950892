"""One student update through the trainer's own pieces (ZeRO-3 aware loading, StudentTerms, objective)
on 2 CPU ranks; rank 0 writes the gathered parameters after one SGD step, for each of CASES in one launch.

Launched by tests/zero3_workers.py (conftest's `zero3_results`, with the other ZeRO-3 workers);
`reference_step` runs the same batch in one process without DeepSpeed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import tropd_kernels as tk

from tropd_ds.config import StudentConfig
from tropd_ds.objectives import loss_fn
from tropd_ds.process import exit_without_teardown

SEQ, K, LR = 10, 6, 0.5
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def with_lora(lm):
    """The trainer's LoRA adapters, with B set away from PEFT's zero start so that A gets a gradient too."""
    from tropd_ds import lora

    lm = lora.apply(lm, LORA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for name, p in sorted(lm.named_parameters()):
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape) * 0.1)
    return lm


def batch(rank: int, vocab: int):
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    select = torch.zeros(2, SEQ - 1, dtype=torch.bool)
    select[:, 3:] = True
    targets = ids[:, 1:][select]
    teacher = tk.teacher_topk(torch.randn(len(targets), vocab, generator=g) * 2, targets, K)
    prefix = torch.zeros(len(targets), dtype=torch.bool)
    prefix[:3] = True
    return ids, mask, select, teacher, ~prefix, prefix


def loss_of(model, rank: int, vocab: int, token_count: float):
    ids, mask, select, teacher, sampled, prefix = batch(rank, vocab)
    terms = model(ids, mask, select, teacher, options=tk.KernelOptions(1.0, "tail", -10.0))
    objective = loss_fn("tropd", trust_mode="expected", beta=0.1)
    return objective(terms, teacher, sampled, prefix, 0, 1, token_count=token_count).loss


def total_tokens(vocab: int) -> float:
    return float(sum(int(batch(r, vocab)[2].sum()) for r in range(2)))


def reference_step(model_dir: str, lora: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from tropd_ds.update import StudentTerms

    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    lm = with_lora(lm) if lora else lm
    model = StudentTerms(lm, lm.config.vocab_size)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    vocab = lm.config.vocab_size
    loss = sum(loss_of(model, r, vocab, total_tokens(vocab)) for r in range(2))
    loss.backward()
    opt.step()
    return {name: p.detach() for name, p in model.named_parameters()}


# The sub-cases of one launch (a launch costs more than all three steps): name -> (checkpointing, lora)
CASES = {"plain": (False, False), "gradient_checkpointing": (True, False), "lora": (False, True)}


def main(model_dir: str, out_dir: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for name, (checkpointing, lora) in CASES.items():
        one_case(model_dir, Path(out_dir) / f"{name}.json", checkpointing, lora)


def one_case(model_dir: str, out_path: Path, checkpointing: bool, lora: bool) -> None:
    import deepspeed

    from tropd_ds.models import load_causal_lm
    from tropd_ds.update import StudentTerms

    rank = torch.distributed.get_rank()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
    }
    lm, _keep = load_causal_lm(StudentConfig(path=model_dir), config)
    lm = with_lora(lm) if lora else lm
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
    model = StudentTerms(lm, lm.config.vocab_size)
    head = lm.get_output_embeddings().weight
    partitioned = head.numel() == 0 or getattr(head, "ds_numel", 0) > head.numel()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(trainable, lr=LR), model_parameters=trainable, config=config
    )
    vocab = lm.config.vocab_size
    # DeepSpeed averages gradients over the 2 ranks: a token count of total / 2 makes the sum exact
    loss = loss_of(engine, rank, vocab, total_tokens(vocab) / 2)
    engine.backward(loss)
    engine.step()
    params = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            params[name] = p.detach().clone().tolist()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"params": params, "lm_head_partitioned": bool(partitioned)}, f)
    engine.destroy()  # the next case (and the next worker in the same launch) starts without its hooks


if __name__ == "__main__":
    main(sys.argv[-2], sys.argv[-1])
    torch.distributed.destroy_process_group()
    exit_without_teardown(0)  # gloo's threads sometimes abort the interpreter's teardown (SIGABRT)
