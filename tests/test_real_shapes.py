"""Real vocabulary layouts: the kernels at the real widths against the oracle, and (`make rehearse`) an lm_head
with more rows than the tokenizer has tokens (every Qwen2.5 model) trained, evaluated and exported on 2 CPU
ranks; the rehearsal at the real layouts of Llama-3.1, Qwen2.5, Mistral and Gemma-2 is tests/test_rehearsal.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import tropd_kernels as tk
from biased_models import pad_vocabulary
from launch import launch, records, write_config

PADDED_ROWS = 32  # for the demo tokenizer's 18 tokens


@pytest.mark.rehearsal  # a 2-rank launch: `make rehearse`
def test_a_padded_lm_head_trains_evaluates_and_exports_with_only_real_tokens(workspace, tmp_path):
    """The demo pair grown to 32 rows for 18 tokens, each padding row as likely as '1' (a common token): before
    the sampler kept to real tokens, this run stopped at step 1 with `targets contains 22: expected ids in
    [0, 18)` in the kernels."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for role in ("student", "teacher"):
        shutil.copytree(workspace / role, tmp_path / role)
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    like = tok.convert_tokens_to_ids("1")
    for role in ("student", "teacher"):
        pad_vocabulary(tmp_path / role, PADDED_ROWS, like=like)
    shutil.copytree(workspace / "data", tmp_path / "data")
    config = write_config(
        tmp_path, "padded", optim={"steps": 3}, checkpoint={"every": 0}, eval={"max_prompts": 4, "temperature": 1.0},
        logging={"samples_every": 1, "progress": False},
    )  # fmt: skip
    launch(config)
    run = tmp_path / "padded"
    steps = [r for r in records(run) if "loss" in r]
    assert len(steps) == 3 and all(r["response_len"] > 0 for r in steps)
    evals = [r for r in records(run) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    for r in evals:  # completions decoded from real ids only (a padding id would decode to nothing)
        assert all(set(e["completion"]) <= set("0123456789+-=;#") for e in r["eval_examples"])
    # the export keeps the model's own rows
    with safe_open(str(run / "export/model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes["lm_head.weight"][0] == PADDED_ROWS and shapes["model.embed_tokens.weight"][0] == PADDED_ROWS
    assert json.loads((run / "export/config.json").read_text())["vocab_size"] == PADDED_ROWS
    assert AutoModelForCausalLM.from_pretrained(run / "export").config.vocab_size == PADDED_ROWS


# (name, vocabulary width the kernels see): the tokenizer's tokens, which is where the head is cut
WIDTHS = [("llama-3.1", 128256), ("qwen2.5", 151665), ("mistral-v0.3", 32768), ("gemma-2", 256000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [w for _, w in WIDTHS], ids=[n for n, _ in WIDTHS])
def test_the_kernels_agree_with_the_oracle_at_real_vocabulary_widths(vocab, dtype):
    """40 rows: more than one of the torch backend's row chunks at these widths (16 MiB / 4 V rows each: 32 at
    Llama's width, 16 at Gemma's), with -inf columns, ignored rows and a peaked row; k = 64 as the presets."""
    from kernel_cases import assert_grad_close, make_case

    close = dict(rtol=1e-5, atol=4e-6)  # fp32 log-probs of magnitude ~10 are exact to ~1e-6 at best
    n, k, temp = 40, 64, 1.0
    teacher_logits, student_logits, targets = make_case(n, vocab, seed=vocab % 1000, dtype=dtype)
    # the oracle in float64: in fp32, its own log-sum-exp over 150k+ entries is off by ~2e-5, while the
    # kernels' streaming pass stays within ~1.1e-6 of exact (measured: Qwen's and Gemma's widths)
    got_t = tk.teacher_topk(teacher_logits, targets, k, temp, backend="torch")
    want_t = tk.teacher_topk_oracle(teacher_logits.double(), targets, k, temp)
    assert torch.equal(got_t.ids, want_t.ids)
    for name in ("logprobs", "target_logprob", "entropy"):
        want = getattr(want_t, name).float()
        torch.testing.assert_close(getattr(got_t, name), want, **close, msg=name)
    teacher = tk.TeacherTopK(*(t.float() if t.is_floating_point() else t for t in want_t))
    ours = student_logits.clone().requires_grad_()
    ref = student_logits.double().clone().requires_grad_()
    got = tk.token_terms(ours, targets, teacher, temp, "tail", None, None, backend="torch")
    want = tk.token_terms_oracle(ref, targets, want_t, temp, "tail", None, None)
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name).float(), **close)
    (got.logprob + 0.5 * got.fkl).sum().backward()
    (want.logprob + 0.5 * want.fkl).sum().backward()
    assert_grad_close(ours.grad, ref.grad.float())


# (lm_head rows, tokenizer tokens): Qwen2.5's padded head (its 399 padding rows masked out), the same head
# whole, Llama-3.1's, and two widths around the interpreter's 8,192-entry block (no tail / a tail only)
PADDED_HEADS = [(152064, 151665), (152064, 152064), (128256, 128256), (8192, 8192), (8192, 8000)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows,vocab", PADDED_HEADS, ids=[f"{r}-rows-{v}-tokens" for r, v in PADDED_HEADS])
def test_the_from_hidden_ops_on_a_whole_padded_head_agree_with_the_oracle_on_its_real_rows(rows, vocab, backend):
    """`vocab=` keeps the head's aligned row count in the projected logits and masks the rows past the
    tokenizer: the terms and gradients equal the oracle's on the real rows alone (padding rows made the most
    likely of all, so that reading any of them would show), and the padding rows get exactly zero gradient."""
    from kernel_cases import DEVICE, assert_grad_close

    g = torch.Generator().manual_seed(rows + vocab)
    n, d, k = 5, 8, 16
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(rows, d, generator=g) * 0.5
    bias = torch.randn(rows, generator=g)
    weight[vocab:], bias[vocab:] = hidden.mean(0) * 4, 10.0  # padding rows: the most likely, if they were read
    targets = torch.randint(vocab, (n,), generator=g)
    targets[1] = -100
    hidden, weight, bias, targets = (t.to(DEVICE) for t in (hidden, weight, bias, targets))

    def real_logits(h, w, b):
        return h @ w[:vocab].T + b[:vocab]

    want_t = tk.teacher_topk_oracle(real_logits(hidden, weight, bias).double(), targets, k)
    got_t = tk.teacher_topk_from_hidden(hidden, weight, targets, k, bias=bias, backend=backend, vocab=vocab)
    assert torch.equal(got_t.ids, want_t.ids) and int(got_t.ids.max()) < vocab
    for name in ("logprobs", "target_logprob", "entropy"):
        torch.testing.assert_close(getattr(got_t, name), getattr(want_t, name).float(), rtol=1e-5, atol=4e-6)
    teacher = tk.TeacherTopK(*(t.float() if t.is_floating_point() else t for t in want_t))
    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    got = tk.token_terms_from_hidden(
        ours[0], ours[1], targets, teacher, bias=ours[2], fkl_mode="tail", backend=backend, vocab=vocab
    )
    want = tk.token_terms_oracle(real_logits(*ref), targets, want_t, 1.0, "tail")
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name).float(), rtol=1e-5, atol=4e-6)
    (got.logprob + 0.5 * got.fkl).sum().backward()
    (want.logprob + 0.5 * want.fkl).sum().backward()
    for a, b in zip(ours, ref):
        assert_grad_close(a.grad, b.grad.float())
    assert not ours[1].grad[vocab:].any() and not ours[2].grad[vocab:].any()


@pytest.mark.parametrize("bad", [0, 152065, 1.5, True, "151665"])
def test_a_vocab_outside_the_heads_rows_is_refused_naming_it(bad):
    hidden, weight, targets = torch.zeros(2, 4), torch.zeros(152064, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"vocab={bad!r}: expected None or an integer in \[1, 152064\]"):
        tk.teacher_topk_from_hidden(hidden, weight, targets, 4, vocab=bad)


def test_targets_and_k_are_checked_against_the_real_rows_not_the_heads():
    hidden, weight = torch.zeros(2, 4), torch.zeros(64, 4)
    with pytest.raises(ValueError, match=r"targets contains 50: expected ids in \[0, 40\)"):
        tk.teacher_topk_from_hidden(hidden, weight, torch.tensor([3, 50]), 4, vocab=40)
    with pytest.raises(ValueError, match=r"k=41: expected an integer in \[1, V=40\]"):
        tk.teacher_topk_from_hidden(hidden, weight, torch.tensor([3, 5]), 41, vocab=40)


def test_a_vocab_of_one_real_row_is_accepted_and_scores_that_row_alone():
    """The range's low edge (kills projection.check_vocab 6 and 7, which refuse vocab = 1): one real row of a
    head of 8, so every target is token 0 with log-prob 0, whatever the padding rows say."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 4), torch.randn(8, 4)
    got = tk.teacher_topk_from_hidden(hidden, weight, torch.zeros(3, dtype=torch.long), 1, vocab=1)
    assert got.ids.tolist() == [[0], [0], [0]]
    assert got.logprobs.abs().max() == 0 and got.target_logprob.abs().max() == 0 and got.entropy.abs().max() == 0
