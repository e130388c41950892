"""The versions setup.py declares hold the APIs the code calls. A CPU suite runs one torch (the newest
allowed) and never takes the CUDA-only branches, so an API newer than the declared floor, or one that exists
only on CUDA, is found here by reading the source instead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "tropd_ds").rglob("*.py")), *sorted((ROOT / "kernels").rglob("*.py"))]

# what the code may call -> the first torch release that has it (on every device the call can meet)
TORCH_APIS = {
    r"out_dtype\s*=": (2, 8),  # torch.mm / torch.bmm with an fp32 result from bf16 operands (CUDA only before 2.8)
    r"torch\.accelerator\.current_device_index": (2, 7),
    r"torch\.accelerator\.": (2, 6),
    r"torch\.get_device_module": (2, 3),
}


def declared_floor(package: str) -> tuple[int, ...]:
    text = (ROOT / "setup.py").read_text()
    found = re.search(rf'"{package}>=([0-9.]+)', text)
    assert found, f"setup.py declares no lower bound for {package}"
    return tuple(int(x) for x in found.group(1).split("."))


def uses(pattern: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{n}"
        for path in SOURCES
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line) and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize("pattern", sorted(TORCH_APIS))
def test_the_declared_torch_floor_has_every_api_the_code_calls(pattern):
    need, floor = TORCH_APIS[pattern], declared_floor("torch")
    where = uses(pattern)
    assert not where or floor >= need, (
        f"{where} call an API of torch {'.'.join(map(str, need))}, but setup.py accepts torch "
        f"{'.'.join(map(str, floor))}: raise the floor, or add a fallback"
    )


def test_the_table_is_not_stale():
    """Each API the table names is still called somewhere (else the table guards nothing)."""
    assert uses(r"out_dtype\s*=") and uses(r"torch\.accelerator\.")
