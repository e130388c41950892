"""token_terms_from_hidden under ZeRO-3 on 2 real CPU ranks, where lm_head.weight is partitioned."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import zero3_lm_head_worker as worker  # noqa: E402


def test_zero3_step_with_partitioned_lm_head_matches_single_process(zero3_results):
    result = json.loads((zero3_results / "lm_head.json").read_text())  # conftest's one launch of the workers
    assert result["lm_head_partitioned"], "lm_head.weight was not partitioned: the test would prove nothing"

    # single-process reference on the oracle: both ranks' halves, one token mean, the same SGD step
    model = worker.build_model(oracle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [worker.batch(r) for r in range(2)]
    total = float(sum(int((b[1] != -100).sum()) for b in batches))
    losses = [model(*b, total / 2) for b in batches]
    (sum(losses) / 2).backward()
    optimizer.step()

    for got, want in zip(result["losses"], losses):
        assert abs(got - float(want.detach())) < 1e-5
    initial = dict(worker.build_model().named_parameters())
    for name, p in model.named_parameters():
        got = torch.tensor(result["params"][name])
        assert not torch.allclose(got, initial[name]), f"{name} did not move: no gradient reached it"
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=name)
