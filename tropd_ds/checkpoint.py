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


def export_from_checkpoint(ckpt_dir: str, student_path: str, out_dir: str, tag: str | None = None) -> str:
    """Consolidate a ZeRO checkpoint (any number of ranks) on the CPU, without engines, and save it
    with the student's config and tokenizer as a Hugging Face folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .config import ConfigError

    if tag is None:
        latest = Path(ckpt_dir) / "latest"
        if not latest.is_file():
            raise ConfigError(f"checkpoint.dir={ckpt_dir!r} has no 'latest' file: no checkpoint to export")
        tag = latest.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        tags = sorted(p.name for p in Path(ckpt_dir).glob("step*"))
        raise ConfigError(f"checkpoint tag {tag!r} is not in {ckpt_dir!r}: available {tags}")
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    state = {k.removeprefix("lm."): v for k, v in state.items()}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ConfigError(f"checkpoint {tag} does not match the student at {student_path}: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(student_path).save_pretrained(out_dir)
    return str(Path(ckpt_dir) / tag)
