"""LoRA students (`student.lora: {r, alpha, dropout, target_modules}`, the `peft` extra).

PEFT injects the adapters into the causal LM's own modules; the trainer keeps that adapted model (not the
PeftModel wrapper), so rollouts, scoring, the vocabulary kernels and ZeRO-3 see an ordinary model whose
base parameters are frozen and partitioned like any other. Only the adapters train. A checkpoint holds
the whole module and the adapters' optimiser state; an export merges W + (alpha / r) B A into the base
weights (a plain Hugging Face folder), or writes the adapter alone in PEFT's format."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError
from .config import lora_settings as settings

ADAPTER = "default"  # PEFT's name of the one adapter
INIT_SEED = 1234  # adapters are initialised from a fixed seed: every rank builds the same ones


def peft_config(lora: dict):
    from peft import LoraConfig

    s = settings(lora)
    return LoraConfig(
        r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"], target_modules=s["target_modules"],
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip


def linear_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules matches)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))})


def apply(lm, lora: dict):
    """`lm` with LoRA adapters injected (base parameters frozen); returns the adapted causal LM itself.
    Refuses targets that match nothing, a target that is not a linear layer, and the output head (the
    vocabulary kernels read its weight directly)."""
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    head = lm.get_output_embeddings()
    # manual_seed seeds every device: PEFT may initialise on the base layer's GPU, so its RNG is forked too
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(INIT_SEED)
            adapted = get_peft_model(lm, peft_config(lora)).get_base_model()
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise ConfigError(
            f"student.lora.target_modules={lora.get('target_modules', 'all-linear')!r} matches no module of the "
            f"student ({str(exc).splitlines()[0][:200].rstrip('.')}); its linear layers are named "
            f"{', '.join(linear_names(lm))}"
        ) from exc
    for name, module in adapted.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        if base is head:
            raise ConfigError(
                f"student.lora.target_modules puts an adapter on the output head {name!r}: tropd-ds reads the head's "
                "weight directly in its vocabulary kernels; leave the head out"
            )
        if not isinstance(base, (torch.nn.Linear, Conv1D)):
            raise ConfigError(
                f"student.lora.target_modules puts an adapter on {name!r}, of type {type(base).__name__}: only linear "
                f"layers are supported ({', '.join(linear_names(adapted))})"
            )
    return adapted


def check(student_path: str, lora: dict) -> int:
    """Before any engine: the adapters built on the student's architecture (meta device, no weights).
    Returns the number of trainable parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .extras import require

    require("peft", "student.lora")
    r = settings(lora)["r"]
    with torch.device("meta"):  # the adapters too: a huge r allocates nothing here
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_path))
        adapted = apply(model, lora)
    shapes = {
        name: tuple(module.base_layer.weight.shape)
        for name, module in adapted.named_modules()
        if hasattr(module, "lora_A") and getattr(module, "base_layer", None) is not None
    }
    if shapes:
        smallest = min(shapes, key=lambda name: min(shapes[name]))
        bound = min(shapes[smallest])
        if r > bound:
            raise ConfigError(
                f"student.lora.r={r}: expected an integer in [1, {bound}], at most the smallest dimension of the "
                f"weights it adapts ({smallest!r} is {' x '.join(map(str, shapes[smallest]))}): an adapter's rank "
                "cannot exceed its weight's"
            )
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def _modules(state: dict) -> list[str]:
    return sorted({k[: -len(f".lora_A.{ADAPTER}.weight")] for k in state if k.endswith(f".lora_A.{ADAPTER}.weight")})


def merged_state(state: dict, lora: dict) -> dict:
    """The adapted model's state dict (PEFT names: ...base_layer.weight, ...lora_A.default.weight) as the
    base model's, with W + (alpha / r) B A merged into each adapted weight (in float32, then the weight's
    dtype). A Conv1D weight (GPT-2) is stored transposed; the delta follows it."""
    s = settings(lora)
    scale = s["alpha"] / s["r"]
    out = {}
    adapted = set(_modules(state))
    for key, value in state.items():
        if ".lora_" in key:
            continue
        module = key.rsplit(".base_layer.", 1)[0] if ".base_layer." in key else None
        if module is None or module not in adapted:
            out[key] = value
            continue
        name = key.replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            a = state[f"{module}.lora_A.{ADAPTER}.weight"].float()
            b = state[f"{module}.lora_B.{ADAPTER}.weight"].float()
            delta = (b @ a) * scale
            if delta.shape != value.shape:
                delta = delta.T
            out[name] = (value.float() + delta).to(value.dtype)
        else:
            out[name] = value
    return out


def adapter_state(state: dict) -> dict:
    """The adapters alone, under the names PEFT saves them with (base_model.model.<module>.lora_A.weight)."""
    return {
        f"base_model.model.{k.replace(f'.{ADAPTER}.', '.')}": v.contiguous()
        for k, v in state.items()
        if ".lora_A." in k or ".lora_B." in k
    }


def save_adapter(state: dict, lora: dict, base_path: str, out_dir: str | Path) -> None:
    """adapter_model.safetensors + adapter_config.json: `PeftModel.from_pretrained(base, out_dir)` loads it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_config(lora)
    config.base_model_name_or_path = base_path
    config.save_pretrained(str(out))
    save_file(adapter_state(state), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "tropd_lora.json").write_text(json.dumps(settings(lora), indent=1))
