"""Files tropd-ds ships besides its code: the presets and model shapes under configs/, the DeepSpeed configs
under ds_configs/. In a clone they are at the repository's top; a wheel carries a copy of both folders inside
the package (tropd_ds/_shipped/, made by setup.py), where the presets' relative paths to ds_configs/ still
hold."""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIRS = ("configs", "ds_configs")
PACKAGE_COPY = Path(__file__).resolve().parent / "_shipped"
CHECKOUT = Path(__file__).resolve().parents[1]


def shipped(*parts: str) -> Path:
    """The shipped file or folder at `parts` (e.g. "configs", "models"): the checkout's when tropd-ds runs
    from a clone (or an editable install), else the package's copy."""
    if not parts or parts[0] not in SHIPPED_DIRS:
        raise ValueError(f"{'/'.join(parts)!r}: expected a path under one of {', '.join(SHIPPED_DIRS)}")
    in_checkout = CHECKOUT.joinpath(*parts)
    if (CHECKOUT / "setup.py").is_file() and in_checkout.exists():
        return in_checkout
    return PACKAGE_COPY.joinpath(*parts)


def preset_path(spec: str) -> str:
    """`spec` as given when it names a file; else a shipped preset's path when `spec` is its name (with or
    without .yaml, e.g. llama70b_to_llama8b_1x8), so that presets are usable by name from an installed
    package; else `spec` unchanged (the caller names what is missing)."""
    if Path(spec).exists():
        return spec
    name = spec if spec.endswith((".yaml", ".yml")) else f"{spec}.yaml"
    candidate = shipped("configs", "presets") / name
    return str(candidate) if "/" not in spec and candidate.is_file() else spec


def preset_names() -> list[str]:
    return sorted(p.stem for p in shipped("configs", "presets").glob("*.yaml"))
