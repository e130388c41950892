"""Optional features and the extra that installs each: a feature asked for without its package is a
ConfigError naming the `pip install` line, before any engine starts."""

from __future__ import annotations

import importlib.util

from .config import ConfigError

# module -> (extra, what needs it)
EXTRAS = {
    "peft": ("peft", "LoRA students (student.lora)"),
    "math_verify": ("eval", "math-verify answer checks"),
    "tensorboard": ("tensorboard", "DeepSpeed's TensorBoard monitor"),
    "wandb": ("wandb", "DeepSpeed's Weights & Biases monitor"),
    "trl": ("bench", "the TRL comparison of scripts/bench_step.py"),
    "liger_kernel": ("liger", "the Liger comparison of scripts/bench_kernels.py"),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, asked_by: str) -> None:
    """ConfigError naming the extra when `module` is not installed; `asked_by` is the setting that wants it."""
    if installed(module):
        return
    extra, feature = EXTRAS[module]
    raise ConfigError(
        f"{asked_by} needs {feature}, which needs the {module!r} package: pip install 'tropd-ds[{extra}]'"
    )
