"""Checkpoints: DeepSpeed checkpoints that resume exactly (optimiser, schedule, RNG states, data
position), keeping the last K; and the export of the student as a Hugging Face folder."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int) -> None:
    tag = f"step{step}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={**client_state, "step": step})
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, Path(ckpt_dir) / tag / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0 and keep_last > 0:
        tags = sorted((p for p in Path(ckpt_dir).glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


def resume(engine, ckpt_dir: str) -> dict | None:
    """Load the newest checkpoint if there is one; returns its client state."""
    if not (Path(ckpt_dir) / "latest").exists():
        return None
    path, client = engine.load_checkpoint(ckpt_dir, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = (Path(ckpt_dir) / "latest").read_text().strip()
    rng = torch.load(Path(ckpt_dir) / tag / f"rng_rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return client


def export(engine, tokenizer, out_dir: str) -> None:
    """A folder with config, tokenizer and model.safetensors that AutoModelForCausalLM loads."""
    lm = engine.module.lm
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # full weights on rank 0 only
    else:
        state = engine.module.state_dict()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    _barrier()
