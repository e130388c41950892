"""The config documents itself (`tropd-ds config --list / --dump`) and the learning rate follows the
`transformers` schedule the config names."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import torch
import yaml

from tropd_ds import cli
from tropd_ds.config import RunConfig, load_config
from tropd_ds.engines import lr_schedule


def all_keys() -> set[str]:
    out = set()
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        if dataclasses.is_dataclass(cls):
            out |= {f"{section.name}.{f.name}" for f in dataclasses.fields(cls)}
        else:
            out.add(section.name)
    return out


def test_config_list_documents_every_field(capsys):
    assert cli.main(["config", "--list", "--json"]) == 0
    fields = {f["key"]: f for f in json.loads(capsys.readouterr().out)}
    assert set(fields) == all_keys()
    missing = [k for k, f in fields.items() if not f["meaning"].strip()]
    assert not missing, f"fields without a line of meaning (a comment in tropd_ds/config.py): {missing}"
    assert fields["rollout.top_p"]["accepted"] == "a number in (0, 1]" and fields["rollout.top_p"]["default"] == 1.0
    assert fields["optim.schedule"]["accepted"].startswith("one of cosine_with_min_lr")
    assert "or a hub id" in fields["student.path"]["accepted"]
    assert "LoRA" in fields["student.lora"]["meaning"]
    assert cli.main(["config", "--list"]) == 0
    text = capsys.readouterr().out
    assert "rollout.temperature  (float, default 1.0; a number > 0)" in text


def test_config_dump_prints_the_resolved_config(workspace, capsys):
    from launch import write_config

    config = write_config(workspace, "dumped")
    assert cli.main(["config", "--dump", "--config", str(config), "--set", "optim.lr=3e-4"]) == 0
    dumped = yaml.safe_load(capsys.readouterr().out)
    assert dumped["optim"]["lr"] == 3e-4 and dumped["optim"]["betas"] == [0.9, 0.999]
    assert dumped["student"]["path"] == str(workspace / "student") and dumped["seed"] == 0
    # the dump is a config: loading it gives the same run
    (workspace / "dumped_again.yaml").write_text(yaml.safe_dump(dumped))
    again = load_config(workspace / "dumped_again.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(load_config(config, ["optim.lr=3e-4"]))
    assert cli.main(["config", "--dump", "--config", str(config), "--set", "optim.lr=-1"]) == 2
    assert "optim.lr=-1.0: expected a number > 0" in capsys.readouterr().err


def lrs(steps: int, **optim) -> list[float]:
    cfg = load_config(None, [f"optim.{k}={v}" for k, v in dict(steps=steps, lr=1.0, **optim).items()])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule, out = lr_schedule(opt, cfg.optim), []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return out


def test_the_learning_rate_follows_the_named_transformers_schedule():
    # cosine to a tenth after 4 warm-up steps from 0
    got = lrs(20, warmup_steps=4, min_lr_ratio=0.1)
    want = [s / 4 for s in range(4)] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(4, 20)]
    assert got == pytest.approx(want, abs=1e-9)
    assert lrs(10) == pytest.approx([1.0] * 10)  # the default: constant
    assert lrs(10, schedule="linear", warmup_steps=2) == pytest.approx([0, 0.5] + [(10 - s) / 8 for s in range(2, 10)])
    wsd = lrs(10, schedule="warmup_stable_decay", warmup_steps=2, schedule_kwargs="{num_decay_steps: 4}")
    assert wsd[:2] == pytest.approx([0, 0.5]) and wsd[2:6] == pytest.approx([1.0] * 4)
    assert wsd[6:] == sorted(wsd[6:], reverse=True) and wsd[-1] < 0.2  # the decay phase
