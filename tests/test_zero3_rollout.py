"""ZeRO-3 rollouts under the real launcher (2 CPU ranks): a student that samples the pad token keeps
every sampled token in the loss, and hook-free generation samples what the hooked path samples and
leaves the engine so that the next update equals that of an engine whose hooks were never touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def test_hook_free_rollout_under_zero3(zero3_results):
    """conftest's one launch of the workers: a biased student (pad likely, eos unlikely) and a plain one."""
    from tropd_ds.demo_task import build_tokenizer

    tok = build_tokenizer()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    result = json.loads((zero3_results / "rollout.json").read_text())
    pads = changed = 0
    for rank in result["ranks"]:
        free, hooked = rank["hook_free"], rank["hooked"]
        for field in ("input_ids", "attention_mask", "sampled", "after_update"):
            assert free[field] == hooked[field], f"{field} differs between hook-free and hooked generation"
        # a plain student: its samples follow its weights, so a stale gathered copy after the update would show
        plain = rank["plain"]
        assert plain["hook_free"]["input_ids"] == plain["hooked"]["input_ids"]
        assert plain["hook_free"]["after_update"] == plain["hooked"]["after_update"]
        changed += plain["hooked"]["after_update"] != plain["hooked"]["input_ids"]
        # hook-free teacher scoring (gathered once) equals ZeRO-3's layer-by-layer scoring
        for got, want in zip(rank["scoring"]["hook_free"], rank["scoring"]["hooked"]):
            assert got[0] == want[0]  # the teacher's top-k ids
            for a, b in zip(got[1:], want[1:]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-6)
        assert free["hooks_restored"] and free["hooks"] > 10, (
            "the module hooks (ids, functions, order) are as before generation"
        )
        assert free["hook_calls_while_generating"] == 0 and hooked["hook_calls_while_generating"] > 100
        # asking whether every row ended every 5 tokens instead of every token: the same tokens, gathered and
        # layer by layer (where the 2 ranks agree at each check)
        assert free["same_when_checked_every_5_tokens"] and hooked["same_when_checked_every_5_tokens"]
        assert free["same_with_dynamic_cache"] and hooked["same_with_dynamic_cache"]  # the preallocated KV cache
        ids, sampled = torch.tensor(free["input_ids"]), torch.tensor(free["sampled"])
        seen = ids[:, 1:][sampled]
        pads += int((seen == pad).sum())
        assert free["loss_sampled_tokens"] == int(sampled.sum()), "every sampled token, pads included, is in the loss"
        width = len(free["input_ids"][0]) - int(sampled.sum(1).max())
        for row, mask in zip(free["input_ids"], free["attention_mask"]):
            n = sum(mask[width:])
            assert all(t != eos for t in row[width : width + n - 1]) and all(t == pad for t in row[width + n :])
    assert pads >= 10, "the student sampled pad tokens and they are in the mask"
    assert changed >= 1, "the update changed the plain student's samples (same seed before and after)"
    bad = []
    for name, want in result["params"]["hooked"].items():
        got = torch.tensor(result["params"]["hook_free"][name])
        if not torch.allclose(got, torch.tensor(want), rtol=1e-6, atol=0):
            bad.append(name)
    assert not bad, f"the update after hook-free generation differs in {bad}"
