"""Collectives go through tropd_ds.collectives, which places tensors where the backend needs them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tropd_ds import collectives

PACKAGE = Path(__file__).resolve().parents[1] / "tropd_ds"
COLLECTIVE = re.compile(
    r"\b(?:dist|torch\.distributed|deepspeed\.comm|comm)\.(all_reduce|all_gather\w*|barrier|broadcast\w*|reduce_scatter\w*|reduce|gather\w*|scatter\w*|send|recv)\("
)


def test_no_collective_outside_the_helper():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "collectives.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVE.search(line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "collectives outside tropd_ds/collectives.py:\n" + "\n".join(offenders)
    assert COLLECTIVE.search("        dist.all_reduce(t)")  # the pattern does catch a collective


def test_under_nccl_tensors_go_to_the_accelerator_and_come_back_on_cpu(monkeypatch):
    seen = {}

    def fake_all_reduce(t, op=None):
        seen["device"], seen["op"] = t.device, op
        t.mul_(2)

    monkeypatch.setattr(collectives.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(collectives.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(collectives.dist, "get_backend", lambda *a: "nccl")

    class Accelerator:  # stands in for a CUDA accelerator: its "current device" is the meta device here
        def device_name(self):
            return "meta"

        def current_device(self):
            return 0

    import deepspeed.accelerator

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    assert collectives.device() == torch.device("meta", 0)
    with torch.device("cpu"):
        try:
            collectives.all_reduce([1.0, 2.0], op="max")
        except NotImplementedError:  # .cpu() of a meta tensor: the reduction itself was on the device
            pass
    assert seen["device"].type == "meta" and seen["op"] == collectives.dist.ReduceOp.MAX

    monkeypatch.setattr(collectives.dist, "get_backend", lambda *a: "gloo")
    assert collectives.device() == torch.device("cpu")
    assert collectives.all_reduce([1.0, 2.0]).tolist() == [2.0, 4.0]
    assert seen["device"].type == "cpu"


def test_without_a_process_group_values_pass_through():
    assert collectives.all_reduce([3.0]).tolist() == [3.0]
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
    assert collectives.rank_world() == (0, 1)
