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


def mixed_length_rollouts(tok, rows: int = 7, seed: int = 0):
    """Left-padded prompts of 2 .. 9 tokens, a teacher prefix on some rows, responses of 1 .. 14 tokens,
    right-padded: micro-batches with pad columns on both sides."""
    from tropd_ds.rollout import RolloutTokens

    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    prompt_lens = [2 + (3 * i) % 8 for i in range(rows)]
    prefix_lens = [(i % 3) * 2 for i in range(rows)]
    response_lens = [1 + (5 * i) % 14 for i in range(rows)]
    width = max(prompt_lens) + max(p + r for p, r in zip(prefix_lens, response_lens))
    ids = torch.full((rows, width), tok.pad_token_id)
    mask = torch.zeros(rows, width, dtype=torch.long)
    sampled = torch.zeros(rows, width - 1, dtype=torch.bool)
    prefix = torch.zeros(rows, width - 1, dtype=torch.bool)
    start = max(prompt_lens)  # where every row's continuation (prefix, then response) begins
    for i, (p, q, r) in enumerate(zip(prompt_lens, prefix_lens, response_lens)):
        ids[i, start - p : start + q + r] = torch.randint(3, vocab, (p + q + r,), generator=g)
        mask[i, start - p : start + q + r] = 1
        prefix[i, start - 1 : start - 1 + q] = True  # target t sits at index t - 1
        sampled[i, start - 1 + q : start - 1 + q + r] = True
    return RolloutTokens(ids, mask, sampled, prefix)


def test_micro_batches_without_pad_columns_score_and_update_as_at_full_width():
    """Teacher and student micro-batches leave out the columns that are padding in every one of their rows,
    and the teacher's group rollouts of like length: every objective's loss and gradients, and the teacher's
    top-k, equal those of full-width micro-batches in row order (rtol 1e-6)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tropd_ds.objectives import OBJECTIVES, loss_fn
    from tropd_ds.scoring import score

    tok = build_tokenizer()
    torch.manual_seed(1)
    small = dict(vocab_size=len(tok), num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    student_lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, **small)).eval()
    teacher_lm = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, **small)).eval()
    tokens = mixed_length_rollouts(tok)
    trimmed = [rows.input_ids.shape[1] for rows in tokens.micro_batches(3)]
    assert trimmed != [tokens.input_ids.shape[1]] * 3 and min(trimmed) < tokens.input_ids.shape[1] - 5, trimmed
    teacher, student = TeacherScorer(teacher_lm, len(tok)), StudentTerms(student_lm, len(tok))
    options = loss_fn("tropd", k=6).step_options()
    lean = score(teacher, tokens, options, 2, 3)
    full = score(teacher, tokens, options, 2, 3, trim=False)
    for a, b in zip(lean, full):
        assert torch.equal(a.ids, b.ids)
        for x, y in zip(a[1:], b[1:]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    count = float(tokens.targets.sum())
    for name in OBJECTIVES:
        objective = loss_fn(name)
        stats = {"selection_count": count, "entropy_threshold": 0.5} if name in ("reopold", "entropy_opd") else {}
        results = []
        for trim in (True, False):
            student.zero_grad()
            generator = torch.Generator().manual_seed(3)
            losses = []
            for rows, t in zip(tokens.micro_batches(3, trim), full):
                terms = student(rows.input_ids, rows.attention_mask, rows.targets, t, options=options.kernel)
                sampled, prefix = rows.sampled[rows.targets], rows.prefix[rows.targets]
                stats = (
                    {"selection_count": count, "entropy_threshold": 0.5} if name in ("reopold", "entropy_opd") else {}
                )
                out = objective(terms, t, sampled, prefix, 0, 10, generator, token_count=count, **stats)
                out.loss.backward()
                losses.append(out.loss.detach())
            results.append((torch.stack(losses), [p.grad.clone() for p in student.parameters()]))
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7, msg=name)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7, msg=name)
