"""Logits the package reproduces: architectures that scale their logits (Cohere, Granite) are scored
exactly, soft-capped ones (Gemma-2) are refused before any engine, and the start-of-run parity check
catches a transform the package does not apply."""

from __future__ import annotations

import pytest
import torch

from tropd_ds.config import ConfigError
from tropd_ds.demo_task import build_tokenizer
from tropd_ds.models import check_logit_transforms
from tropd_ds.preflight import logit_parity
from tropd_ds.scoring import TeacherScorer
from tropd_ds.update import StudentTerms

TOK = build_tokenizer()


def tiny(kind: str, **extra):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    common = dict(
        vocab_size=len(TOK),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "cohere": (CohereConfig, CohereForCausalLM, {"logit_scale": 0.0625}),
        "granite": (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 8.0}),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 16}),
    }
    config_cls, model_cls, defaults = classes[kind]
    torch.manual_seed(0)
    return model_cls(config_cls(**common, **{**defaults, **extra})).eval()


def parity(lm):
    ids = torch.tensor([TOK("7+8-3=7+8=15;15-3=12;#12")["input_ids"]])
    student, teacher = StudentTerms(lm, len(TOK)), TeacherScorer(lm, len(TOK))
    return logit_parity(student, teacher, ids, torch.ones_like(ids))


@pytest.mark.parametrize("kind", ["llama", "cohere", "granite", "gemma2_without_softcap"])
def test_scaled_logits_are_reproduced(kind):
    lm = tiny("gemma2", final_logit_softcapping=None) if kind.startswith("gemma2") else tiny(kind)
    for role, (worst, _mean) in parity(lm).items():
        assert worst < 1e-4, (kind, role, worst)


def test_the_parity_check_sees_a_transform_that_is_not_applied():
    lm = tiny("cohere")
    student, teacher = StudentTerms(lm, len(TOK)), TeacherScorer(lm, len(TOK))
    student.logit_scale = teacher.logit_scale = 1.0  # as before: h W^T without Cohere's logit_scale
    ids = torch.tensor([TOK("7+8-3=7+8=15;15-3=12;#12")["input_ids"]])
    found = logit_parity(student, teacher, ids, torch.ones_like(ids))
    assert all(worst > 0.05 for worst, _ in found.values()), found


def test_soft_capped_models_are_refused_naming_the_field(tmp_path):
    tiny("gemma2", final_logit_softcapping=30.0).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(ConfigError, match=r"teacher.path=.*final_logit_softcapping=30.0 .*cannot apply"):
        check_logit_transforms(str(tmp_path / "gemma2"), "teacher")
    tiny("cohere").save_pretrained(tmp_path / "cohere")
    check_logit_transforms(str(tmp_path / "cohere"), "student")  # scaling is applied: accepted


def test_a_mismatch_stops_the_run_before_step_1_with_the_figures():
    from types import SimpleNamespace

    import datasets

    from tropd_ds.config import RunConfig
    from tropd_ds.preflight import check_logit_parity

    rows = datasets.Dataset.from_list([{"prompt": "7+8-3=", "teacher_response": "7+8=15;15-3=12;#12"}])
    lm = tiny("cohere")
    student, teacher = StudentTerms(lm, len(TOK)), TeacherScorer(lm, len(TOK))
    engines = SimpleNamespace(module=student), SimpleNamespace(module=teacher)
    logged = []
    assert check_logit_parity(RunConfig(), *engines, rows, TOK, torch.device("cpu"), logged.append)
    assert logged == []
    student.logit_scale = 1.0
    assert not check_logit_parity(RunConfig(), *engines, rows, TOK, torch.device("cpu"), logged.append)
    out = "\n".join(logged)
    assert "student log-probs from the vocabulary kernels differ from the model's own forward by up to" in out
    assert "teacher log-probs" not in out
