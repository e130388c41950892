"""The trainer's student path under ZeRO-3 on 2 CPU ranks: the update that reaches the partitioned
lm_head and the layers below it (through the hidden states) equals one process without DeepSpeed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import zero3_student_worker as worker  # noqa: E402


@pytest.mark.parametrize("case", list(worker.CASES))
def test_student_update_under_zero3_equals_single_process(zero3_results, case):
    """With LoRA: the adapters' update equals a single-process PEFT step and the partitioned base stays put."""
    tmp_path, (_, lora) = zero3_results, worker.CASES[case]
    result = json.loads((tmp_path / f"{case}.json").read_text())
    assert result["lm_head_partitioned"], "lm_head was not partitioned: the test would prove nothing"

    want = worker.reference_step(str(tmp_path / "student"), lora)
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "student").named_parameters())
    assert set(result["params"]) == set(want)
    bad = []
    trained = [name for name in want if "lora_" in name] if lora else list(want)
    if lora:
        adapters = worker.with_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "student")).state_dict()
    assert trained
    for name, p in want.items():
        got = torch.tensor(result["params"][name])
        before = initial.get(name.removeprefix("lm.").replace(".base_layer.", "."))
        if name in trained and before is not None:
            assert not torch.equal(got, before.detach()), f"{name} did not move"
        elif before is not None:  # a frozen base parameter of the LoRA student
            assert torch.equal(got, before.detach()), f"frozen {name} moved"
        if "lora_" in name:  # every adapter moved: A too, since B starts away from zero
            assert not torch.allclose(got, adapters[name.removeprefix("lm.")]), f"{name} did not move"
        if not torch.allclose(got, p, rtol=1e-5, atol=1e-6):
            bad.append((name, float((got - p).abs().max())))
    assert not bad, "; ".join(f"{n}: {e:.2e}" for n, e in bad)
