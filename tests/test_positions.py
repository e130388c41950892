"""Scoring and update forwards position left-padded rows as generation does: with absolute position
embeddings (GPT-2) a left-padded row's log-probs equal those of the same row without padding."""

from __future__ import annotations

import torch

from tropd_ds.demo_task import build_tokenizer
from tropd_ds.scoring import TeacherScorer
from tropd_ds.update import StudentTerms


def tiny_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def test_left_padded_rows_score_as_unpadded_with_absolute_positions():
    import tropd_kernels as tk

    tok = build_tokenizer()
    lm = tiny_gpt2(len(tok))
    row = tok("3+4=7;#7")["input_ids"]
    pads = 5
    padded = torch.tensor([[tok.pad_token_id] * pads + row])
    mask = torch.tensor([[0] * pads + [1] * len(row)])
    alone = torch.tensor([row])
    select_p = torch.zeros(1, padded.shape[1] - 1, dtype=torch.bool)
    select_p[0, pads:] = True
    select_a = torch.ones(1, len(row) - 1, dtype=torch.bool)
    teacher = TeacherScorer(lm, len(tok))
    got = tk.TeacherTopK(*teacher(padded, mask, select_p, 4, 1.0))
    want = tk.TeacherTopK(*teacher(alone, torch.ones_like(alone), select_a, 4, 1.0))
    torch.testing.assert_close(got.target_logprob, want.target_logprob, rtol=1e-5, atol=1e-6)

    student = StudentTerms(lm, len(tok))
    a = student(padded, mask, select_p, want, options=tk.KernelOptions())
    b = student(alone, torch.ones_like(alone), select_a, want, options=tk.KernelOptions())
    torch.testing.assert_close(a.logprob, b.logprob, rtol=1e-5, atol=1e-6)
    # without positions from the mask the padded row would be shifted by 5 positions: the test can fail
    shifted = (
        lm(padded, attention_mask=mask)
        .logits[0, pads:-1]
        .log_softmax(-1)
        .gather(-1, torch.tensor(row[1:])[:, None])
        .squeeze(1)
    )
    assert not torch.allclose(shifted, want.target_logprob, atol=1e-3)
