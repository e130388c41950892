"""The export: the student as a Hugging Face folder (safetensors, config, tokenizer), at the end of a run
(`export`, every rank taking part) or from a run's newest verified checkpoint (`export_from_checkpoint`,
`tropd-ds export`); a folder tropd-ds exported carries tropd_export.json, which says from what and whether
the export completed, so that an interrupted export is never taken for a finished one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import collectives
from .checkpoint import (
    MANIFEST,
    CheckpointError,
    all_ranks_true,
    complete_checkpoints,
    verify,
    write_atomic,
)
from .config import ConfigError
from .ownership import EXPORT_MARK


def mark_export(out_dir: str, source: str, complete: bool = True) -> None:
    """Written before the files (an interrupted export is still recognised as ours) and again after."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out_dir) / EXPORT_MARK, json.dumps({"exported_from": source, "complete": complete}, indent=1))


def export(engine, tokenizer, out_dir: str, student_path: str = "") -> None:
    """A folder with config, tokenizer and model.safetensors that AutoModelForCausalLM loads. A LoRA
    student is exported merged, with its adapter alone in `out_dir/adapter` (PEFT's format)."""
    lm = engine.module.lm
    adapters = getattr(engine.module, "lora", None)
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # full weights on rank 0 only
    else:
        state = engine.module.state_dict()
    rank, _ = collectives.rank_world()
    error = None
    if rank == 0:
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        try:
            mark_export(out_dir, "the end of training", complete=False)
            if adapters:
                from . import lora

                lora.save_adapter(state, adapters, student_path, Path(out_dir) / "adapter")
                state = lora.merged_state(state, adapters)
            lm.save_pretrained(Path(out_dir), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(Path(out_dir))
            mark_export(out_dir, "the end of training")
        except Exception as exc:  # OSError, safetensors' own SafetensorError, ...: every rank must hear of it
            error = f"{type(exc).__name__}: {exc}"
    if not all_ranks_true(error is None):
        raise CheckpointError(f"exporting the student to {out_dir} failed ({error or 'on rank 0'})")


def export_from_checkpoint(
    ckpt_dir: str,
    student_path: str,
    out_dir: str,
    tag: str | None = None,
    lora_settings: dict | None = None,
    adapter_only: bool = False,
    dtype: str = "float32",
    log=print,
) -> str:
    """Consolidate a ZeRO checkpoint (any number of ranks) on the CPU, without engines, and save it
    with the student's config and tokenizer as a Hugging Face folder; a LoRA student's (`lora_settings`)
    merged, or its adapter alone (`adapter_only`). The weights are written in `dtype`, the run's
    student.dtype by default (what the run's own export holds), whatever the student folder was saved in."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    named = tag is not None
    if named and not tag.strip():
        raise ConfigError("--tag is empty: expected a checkpoint tag such as step200, or no --tag for the newest")
    for _ in range(3):  # a running run's rotation (checkpoint.keep_last) may delete the newest under us
        if not named:
            found = complete_checkpoints(ckpt_dir)
            if not found:
                raise ConfigError(
                    f"checkpoint.dir={ckpt_dir!r} has no complete checkpoint (stepN folder with a {MANIFEST}) to export"
                )
            tag = found[0].name
        if not (Path(ckpt_dir) / tag).is_dir():
            tags = sorted(p.name for p in Path(ckpt_dir).glob("step*"))
            raise ConfigError(f"checkpoint tag {tag!r} is not in {ckpt_dir!r}: available {tags}")
        problem = verify(Path(ckpt_dir) / tag) if (Path(ckpt_dir) / tag / MANIFEST).is_file() else f"no {MANIFEST}"
        if problem is not None and (Path(ckpt_dir) / tag).is_dir():
            raise ConfigError(
                f"checkpoint {tag} in {ckpt_dir!r} fails its check ({problem}): nothing was exported; name an intact "
                "one with --tag"
            )
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag) if problem is None else None
        except (OSError, ValueError) as exc:
            if (Path(ckpt_dir) / tag).is_dir():
                raise ConfigError(
                    f"reading checkpoint {tag} in {ckpt_dir!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
            state = None
        if state is not None:
            break
        if named:
            raise ConfigError(
                f"checkpoint {tag} in {ckpt_dir!r} was deleted while it was being read (a running run rotates its "
                "oldest checkpoints away, checkpoint.keep_last): nothing was exported; name a newer one with --tag"
            )
        log(f"checkpoint {tag} went away while it was being read (a running run's rotation?): trying the newest again")
    else:
        raise ConfigError(
            f"the newest checkpoint in {ckpt_dir!r} went away 3 times while it was being read (a running run rotating "
            "its checkpoints): export after that run, or with --tag a checkpoint it keeps"
        )
    state = {k.removeprefix("lm."): v for k, v in state.items()}
    has_adapters = any(".lora_A." in k for k in state)
    if has_adapters != bool(lora_settings):
        raise ConfigError(
            f"checkpoint {tag} {'holds' if has_adapters else 'has no'} LoRA adapters but the config's student.lora is "
            f"{lora_settings or '{}'}: export with the config of the run that wrote it"
        )
    if adapter_only:
        if not has_adapters:
            raise ConfigError(
                "--adapter-only: the run trained every parameter (student.lora is empty); it has no adapter"
            )
        from . import lora

        mark_export(out_dir, str(Path(ckpt_dir) / tag), complete=False)
        lora.save_adapter(state, lora_settings, student_path, out_dir)
        mark_export(out_dir, str(Path(ckpt_dir) / tag))
        return str(Path(ckpt_dir) / tag)
    if has_adapters:
        from . import lora

        state = lora.merged_state(state, lora_settings)

    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # built in fp32 (the checkpoint's master weights), then cast once: from_config alone would follow the
    # student folder's saved dtype, which need not be the run's
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_path), dtype=torch.float32)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ: a student of another size
        raise ConfigError(
            f"checkpoint {tag} does not match the student at {student_path} ({str(exc).strip().splitlines()[-1][:300]}"
            "): export with the config of the run that wrote it"
        ) from exc
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ConfigError(
            f"checkpoint {tag} does not match the student at {student_path}: missing {missing}, unexpected {unexpected}"
        )
    model = model.to(target)
    model.config.dtype = dtype
    mark_export(out_dir, str(Path(ckpt_dir) / tag), complete=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(student_path).save_pretrained(out_dir)
    mark_export(out_dir, str(Path(ckpt_dir) / tag))
    return str(Path(ckpt_dir) / tag)
