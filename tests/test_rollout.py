"""The rollout's response mask, stopping and sampling distribution, on plain (non-DeepSpeed) modules;
tests/test_zero3_rollout.py runs the ZeRO-3 paths under the real launcher."""

from __future__ import annotations

import math

import pytest
import torch
from biased_models import build_biased_llama
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

from tropd_ds import data, rollout
from tropd_ds.data import Prompt
from tropd_ds.demo_models import build_llama
from tropd_ds.demo_task import build_tokenizer

TOK = build_tokenizer()
PAD, BOS, EOS = TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id
SEMI = TOK.convert_tokens_to_ids(";")
TEXTS = ("3+4=", "12-5+1=", "9=", "1+1+1+1+1=", "7-2=", "8-8=", "5+5=", "6=")


def prompts(n=None):
    n = len(TEXTS) if n is None else n
    return [
        Prompt(index=i, ids=TOK(TEXTS[i % len(TEXTS)])["input_ids"], response_ids=None, answer=None) for i in range(n)
    ]


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def engine_for(lm, **kw):
    return rollout.GenerateRollout(lm, PAD, rollout.end_token_ids(TOK, lm), gather=False, **kw)


def check_positions(tokens, width, end_ids, budgets):
    """Row by row, from the ids alone: the sampled targets are exactly the positions width .. first end
    (inclusive) within the budget, whatever their ids; nothing after is sampled or attended."""
    for i in range(tokens.input_ids.shape[0]):
        resp = tokens.input_ids[i, width:].tolist()
        mask = tokens.attention_mask[i, width:].tolist()
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n), "response positions must be contiguous"
        assert n <= budgets[i]
        body = resp[:n]
        assert not any(t in end_ids for t in body[:-1]), "nothing after the first end token"
        if n < budgets[i]:
            assert body and body[-1] in end_ids, "a response shorter than its budget ends with an end token"
        assert all(t == PAD for t in resp[n:])
        sampled = tokens.sampled[i].nonzero().flatten().add(1).tolist()  # target index t-1 -> position t
        assert sampled == list(range(width, width + n))


@pytest.mark.parametrize("special", [PAD, BOS])
def test_sampled_special_tokens_are_in_the_response_mask(tmp_path, special):
    lm = build_biased_llama(tmp_path / "m", TOK, {special: 2.5, EOS: -0.5})
    engine = engine_for(lm)
    torch.manual_seed(0)
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0)
    tokens = rollout.sample(engine, prompts(), [[]] * len(TEXTS), sampling, "cpu")
    width = max(len(p.ids) for p in prompts())
    check_positions(tokens, width, engine.end_ids, [24] * len(TEXTS))
    seen = tokens.input_ids[:, 1:][tokens.sampled]
    assert (seen == special).sum() >= 20, "the biased token was sampled and is in the mask"
    assert (seen == EOS).sum() >= 1
    assert tokens.sampled.sum() > 3 * len(TEXTS)


def test_multiple_end_ids_and_a_row_that_never_ends(tmp_path):
    # ';' ends responses too (as <|eot_id|> does for Llama-3): it is in generation_config.eos_token_id.
    lm = build_biased_llama(tmp_path / "m", TOK, {SEMI: 1.5, EOS: -30.0}, eos_ids=[EOS, SEMI])
    engine = engine_for(lm)
    assert engine.end_ids == (EOS, SEMI)
    torch.manual_seed(1)
    tokens = rollout.sample(engine, prompts(), [[]] * len(TEXTS), SamplingConfig(max_new_tokens=30), "cpu")
    width = max(len(p.ids) for p in prompts())
    check_positions(tokens, width, engine.end_ids, [30] * len(TEXTS))
    last = [tokens.input_ids[i, width + int(tokens.sampled[i].sum()) - 1].item() for i in range(len(TEXTS))]
    assert SEMI in last  # rows stop at the second end id

    never = build_biased_llama(tmp_path / "never", TOK, {EOS: -30.0, PAD: 1.0})
    tokens = rollout.sample(engine_for(never), prompts(), [[]] * len(TEXTS), SamplingConfig(max_new_tokens=9), "cpu")
    assert tokens.sampled.sum(1).tolist() == [9] * len(TEXTS)  # no end token: the whole budget, pads included


def test_decoding_stops_when_every_row_has_ended(tmp_path):
    lm = build_biased_llama(tmp_path / "m", TOK, {EOS: 4.0})
    torch.manual_seed(2)
    tokens = rollout.sample(engine_for(lm), prompts(), [[]] * len(TEXTS), SamplingConfig(max_new_tokens=200), "cpu")
    width = max(len(p.ids) for p in prompts())
    longest = int(tokens.sampled.sum(1).max())
    assert tokens.input_ids.shape[1] == width + longest < width + 20  # not 200 decode steps


def test_prefix_plus_continuation_within_budget_and_ended_prefixes(tmp_path):
    lm = build_biased_llama(tmp_path / "m", TOK, {EOS: -30.0})
    engine = engine_for(lm)
    ps = prompts(5)
    prefixes = [
        [],
        TOK("3")["input_ids"],
        TOK("7;4;1")["input_ids"],
        TOK("1;")["input_ids"] + [EOS],
        TOK("12345678")["input_ids"],
    ]
    tokens = rollout.sample(engine, ps, prefixes, SamplingConfig(max_new_tokens=8), "cpu")
    total = (tokens.sampled | tokens.prefix).sum(1).tolist()
    assert tokens.prefix.sum(1).tolist() == [len(p) for p in prefixes]
    assert tokens.sampled.sum(1).tolist() == [
        8,
        7,
        3,
        0,
        0,
    ]  # the ended prefix samples nothing; a full prefix leaves no room
    assert max(total) <= 8 + 0 * 1 and total == [8, 8, 8, 3, 8]


def test_model_generation_config_does_not_reshape_sampling(tmp_path):
    plain = build_biased_llama(tmp_path / "plain", TOK, {PAD: 0.5, SEMI: 1.0, EOS: -1.0})
    shaped = build_biased_llama(
        tmp_path / "shaped",
        TOK,
        {PAD: 0.5, SEMI: 1.0, EOS: -1.0},
        eos_ids=EOS,
        generation={
            "do_sample": True,
            "repetition_penalty": 2.0,
            "top_k": 3,
            "no_repeat_ngram_size": 2,
            "suppress_tokens": [SEMI],
            "bad_words_ids": [[PAD]],
        },
    )
    assert load(tmp_path / "shaped").generation_config.top_k == 3
    runs = []
    for lm in (plain, load(tmp_path / "shaped")):
        torch.manual_seed(7)
        runs.append(
            rollout.sample(engine_for(lm), prompts(), [[]] * len(TEXTS), SamplingConfig(max_new_tokens=20), "cpu")
        )
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    seen = runs[1].input_ids[:, 1:][runs[1].sampled]
    assert (
        len(set(seen.tolist())) > 3 and SEMI in seen and PAD in seen
    )  # not top-3, suppressed and "bad" tokens sampled
    assert shaped.generation_config.repetition_penalty == 2.0  # restored after generating


def test_generation_in_micro_batches_equals_one_batch(tmp_path):
    build_llama(tmp_path / "m", TOK, hidden=32, layers=1, heads=2, mlp=64, seed=5)
    lm = load(tmp_path / "m")
    ps = prompts(5)
    prefixes = [[], TOK("3")["input_ids"], [], [], TOK("5;")["input_ids"]]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    whole = rollout.sample(engine_for(lm), ps, prefixes, greedy, "cpu")
    for micro in (1, 2, 3):
        parts = rollout.sample(engine_for(lm, micro_batch=micro), ps, prefixes, greedy, "cpu")
        for field in ("input_ids", "attention_mask", "sampled", "prefix"):
            assert torch.equal(getattr(parts, field), getattr(whole, field)), (micro, field)
    assert whole.prefix.sum() == 3


def test_each_micro_batch_is_handed_on_as_the_batch_will_hold_it(tmp_path):
    """`on_part` (a served teacher scores each micro-batch while the next decodes) gets every micro-batch's rows in
    order, with the ids, attention and sampled / prefix masks of the returned batch up to its right padding."""
    build_llama(tmp_path / "m", TOK, hidden=32, layers=1, heads=2, mlp=64, seed=5)
    lm = load(tmp_path / "m")
    ps = prompts(5)
    prefixes = [[], TOK("3")["input_ids"], [], TOK("7;4;1")["input_ids"], TOK("5;")["input_ids"]]
    torch.manual_seed(3)
    parts = []
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    whole = rollout.sample(engine_for(lm, micro_batch=2), ps, prefixes, sampling, "cpu", on_part=parts.append)
    assert [p.input_ids.shape[0] for p in parts] == [2, 2, 1]
    start = 0
    for part in parts:
        rows = slice(start, start + part.input_ids.shape[0])
        width = part.input_ids.shape[1]
        for field in ("input_ids", "attention_mask"):
            assert torch.equal(getattr(part, field), getattr(whole, field)[rows, :width]), field
            assert not getattr(whole, field)[rows, width:].ne(PAD if field == "input_ids" else 0).any()
        for field in ("sampled", "prefix", "targets"):
            assert torch.equal(getattr(part, field), getattr(whole, field)[rows, : width - 1]), field
            assert not getattr(whole, field)[rows, width - 1 :].any()
        start = rows.stop
    assert int(sum(p.targets.sum() for p in parts)) == int(whole.targets.sum()) > 0


def test_teacher_responses_end_at_the_first_end_token(tmp_path):
    lm = build_biased_llama(tmp_path / "m", TOK, {EOS: 1.5, PAD: 1.0})
    torch.manual_seed(3)
    responses = rollout.teacher_responses(engine_for(lm), prompts(), SamplingConfig(max_new_tokens=30), "cpu")
    assert all(r and (r[-1] == EOS or len(r) == 30) and EOS not in r[:-1] for r in responses)
    assert any(PAD in r for r in responses)
    # exactly the sampled tokens after the prompt: what `sample` draws from the same seed, nothing of the prompt
    torch.manual_seed(3)
    tokens = rollout.sample(engine_for(lm), prompts(), [[]] * len(TEXTS), SamplingConfig(max_new_tokens=30), "cpu")
    assert responses == [tokens.input_ids[i, 1:][tokens.sampled[i]].tolist() for i in range(len(TEXTS))]


def test_response_keep_by_position():
    gen = torch.tensor([[5, PAD, EOS, 7, EOS], [PAD, PAD, PAD, PAD, PAD], [EOS, 3, 3, 3, 3], [4, 4, SEMI, 4, 4]])
    keep = rollout.response_keep(gen, (EOS, SEMI), torch.tensor([5, 5, 5, 2]))
    assert keep.sum(1).tolist() == [3, 5, 1, 2]


def test_generate_rollout_request_with_samples_per_prompt(tmp_path):
    lm = build_biased_llama(tmp_path / "m", TOK, {EOS: 0.0})
    ids, mask = data.left_pad([p.ids for p in prompts(3)], PAD, "cpu")
    batch = engine_for(lm).generate(RolloutRequest(ids, mask), SamplingConfig(max_new_tokens=5, n_samples_per_prompt=2))
    assert batch.input_ids.shape[0] == 6 and torch.equal(
        batch.input_ids[0, : ids.shape[1]], batch.input_ids[1, : ids.shape[1]]
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (0.0, 1.0)], ids=["t1", "t0.7_p0.8", "greedy"])
def test_sampling_loop_draws_what_generate_draws(tmp_path, arch, temperature, top_p):
    """The lean loop makes transformers' own draws (same seed) under a neutral generation config, for
    rotary (Llama) and absolute (GPT-2) positions with left padding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if arch == "llama":
        build_llama(tmp_path / "m", TOK, hidden=32, layers=2, heads=2, mlp=64, seed=11)
    else:
        torch.manual_seed(11)
        config = GPT2Config(
            vocab_size=len(TOK),
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=BOS,
        )
        GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    lm = load(tmp_path / "m")
    engine = engine_for(lm)
    ids, mask = data.left_pad([p.ids for p in prompts()], PAD, "cpu")
    sampling = SamplingConfig(max_new_tokens=20, temperature=temperature, top_p=top_p)
    torch.manual_seed(4)
    ours = engine.generate(RolloutRequest(ids, mask), sampling)
    torch.manual_seed(4)
    config = rollout.clean_generation_config(sampling, 20, PAD, engine.end_ids)
    theirs = lm.generate(ids, attention_mask=mask, generation_config=config)
    width = ids.shape[1]
    # the reference response of each row, by hand: generate's tokens up to and including the first end id
    for i, row in enumerate(theirs[:, width:].tolist()):
        ends = [j for j, t in enumerate(row) if t in engine.end_ids]
        want = row[: ends[0] + 1] if ends else row
        mask = ours.attention_mask[i, width:].tolist()
        assert mask == [1] * len(want) + [0] * (len(mask) - len(want)), i
        assert ours.input_ids[i, width : width + len(want)].tolist() == want, i


PADDED_ROWS = 32  # the demo tokenizer has 18 tokens: rows 18 .. 31 are padding, as Qwen2.5's last 399 rows


@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sampled", "greedy"])
def test_padding_rows_of_the_lm_head_are_never_drawn(tmp_path, temperature):
    from biased_models import pad_vocabulary

    # the padding rows are far likelier than any token: a sampler over every row returns them nearly always
    build_biased_llama(tmp_path / "m", TOK, {SEMI: 3.0, EOS: -1.0})
    lm = pad_vocabulary(tmp_path / "m", PADDED_ROWS, like=SEMI, scale=3.0).eval()
    sampling = SamplingConfig(max_new_tokens=16, temperature=temperature)
    torch.manual_seed(0)
    unmasked = rollout.sample(engine_for(lm, vocab=PADDED_ROWS), prompts(), [[]] * len(TEXTS), sampling, "cpu")
    assert int((unmasked.input_ids >= len(TOK)).sum()) > 50, "the padding rows dominate an unmasked sampler"
    torch.manual_seed(0)
    engine = engine_for(lm, vocab=len(TOK))
    tokens = rollout.sample(engine, prompts(), [[]] * len(TEXTS), sampling, "cpu")
    assert int(tokens.input_ids.max()) < len(TOK)
    assert int(tokens.sampled.sum()) >= 16 * len(TEXTS) // 2  # and it did sample (';' then)
    # the default is the wrapped model's own count of real tokens (tropd-ds's VocabHeadModel)
    from tropd_ds.models import VocabHeadModel

    assert rollout.GenerateRollout(VocabHeadModel(lm, len(TOK)), PAD, (EOS,), gather=False).vocab == len(TOK)


def test_tropd_ds_eval_never_returns_a_padding_row(tmp_path):
    import json

    from biased_models import pad_vocabulary

    from tropd_ds import cli

    # greedy: a padding row is the argmax at every step; ';' is the likeliest real token
    build_biased_llama(tmp_path / "m", TOK, {SEMI: 3.0, EOS: -1.0})
    lm = pad_vocabulary(tmp_path / "m", PADDED_ROWS, like=SEMI, scale=3.0).eval()
    ids = torch.tensor([TOK("3+4=")["input_ids"]])
    plain = lm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert int(plain[0, -1]) >= len(TOK), "unmasked, greedy decoding returns a padding row"
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": t, "answer": "1"}) + "\n" for t in TEXTS[:3]))
    args = ["eval", str(tmp_path / "m"), "--data", str(tmp_path / "eval.jsonl"), "--max-new-tokens", "6"]
    assert cli.main([*args, "--records", str(tmp_path / "records.jsonl"), "--device", "cpu"]) == 0
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in records] == [[";" * 6]] * 3  # padding ids would decode to nothing


# ----------------------------------------------------------------------------- exact values (found by mutation testing)


def test_rollout_metrics_count_lengths_ends_and_sampled_pads_by_hand():
    # row 0: prompt 2, prefix 1 (id 9), sampled 4, 5, EOS; row 1: prompt 1, sampled PAD, PAD, 6 (no end); row 2 none
    ids = torch.tensor([[1, 2, 9, 4, 5, EOS], [0, 0, 3, PAD, PAD, 6], [0, 0, 0, 0, 0, 3]])
    sampled = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    prefix = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    tokens = rollout.RolloutTokens(ids, torch.ones_like(ids), sampled, prefix)
    got = rollout.rollout_metrics(tokens, (EOS, SEMI), PAD)
    want = {"response_len": 2.0, "prefix_len": 1 / 3, "ended_fraction": 1 / 3, "sampled_pad_fraction": 2 / 6}
    assert got == pytest.approx(want, rel=1e-6)  # float32 means
    # a pad that is also an end token is an end, not a stray pad; no sampled token gives a pad fraction of 0
    assert rollout.rollout_metrics(tokens, (PAD,), PAD)["sampled_pad_fraction"] == 0.0
    assert rollout.rollout_metrics(tokens, (PAD,), PAD)["ended_fraction"] == 1 / 3  # rows, not end tokens
    none = rollout.RolloutTokens(ids, torch.ones_like(ids), torch.zeros_like(sampled), prefix)
    assert rollout.rollout_metrics(none, (EOS,), PAD)["sampled_pad_fraction"] == 0.0
    assert rollout.rollout_metrics(tokens.rows(0, 1), (EOS,), PAD)["ended_fraction"] == 1.0  # 1 of 1 rows
    assert rollout.rollout_metrics(tokens, (EOS, 6), PAD)["ended_fraction"] == pytest.approx(2 / 3)  # 2 of 3 rows


def test_prefixes_are_the_teacher_responses_first_l_tokens_with_l_drawn_uniformly():
    ps = [
        Prompt(index=0, ids=[1], response_ids=list(range(10, 30)), answer=None),
        Prompt(index=1, ids=[1], response_ids=None, answer=None),
        Prompt(index=2, ids=[1], response_ids=[7, 8, 9], answer=None),
    ]
    got = rollout.choose_prefixes(ps, 0, 10, 8, True, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # by hand: l ~ U{0 .. min(8, 20)}, then U{0 .. min(8, 3)}
    want0 = int(torch.randint(0, 9, (1,), generator=g))
    want2 = int(torch.randint(0, 4, (1,), generator=g))
    assert got == [list(range(10, 10 + want0)), [], [7, 8, 9][:want2]]
    assert rollout.choose_prefixes(ps, 0, 10, 8, False, torch.Generator()) == [[], [], []]
    lengths = {len(rollout.choose_prefixes(ps[2:], 0, 10, 8, True, g)[0]) for _ in range(200)}
    assert lengths == {0, 1, 2, 3}  # every length up to the whole response, never more


def test_the_guidance_schedule_by_hand_and_its_refusals():
    assert [max_len(s) for s in (0, 1, 5, 9, 10, 11)] == [
        math.floor(40 * (1 + math.cos(math.pi * s / 10)) / 2) for s in (0, 1, 5, 9, 10, 10)
    ]
    assert rollout.max_prefix_len(3, 1, 7) == 0 and rollout.max_prefix_len(0, 1, 7) == 7
    assert rollout.max_prefix_len(0, 5, 0) == 0
    for args in ((-1, 10, 4), (0, 0, 4), (0, 10, -1)):
        with pytest.raises(ValueError, match=r"expected 0 <= step, 1 <= total_steps, 0 <= l_max"):
            rollout.max_prefix_len(*args)
    g = torch.Generator().manual_seed(0)
    assert {rollout.draw_prefix_len(0, 10, 40, -3, g) for _ in range(20)} == {0}  # no response, no prefix
    assert {rollout.draw_prefix_len(5, 10, 4, 100, g) for _ in range(200)} == {0, 1, 2}  # floor(4 * 0.5) = 2


def max_len(step):
    return rollout.max_prefix_len(step, 10, 40)


def test_left_pad_end_ids_and_real_token_columns_by_hand():
    ids, mask = data.left_pad([[4, 5, 6], [7], []], PAD, "cpu")
    assert ids.tolist() == [[4, 5, 6], [PAD, PAD, 7], [PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]] and ids.dtype == mask.dtype == torch.long

    class Gen:
        def __init__(self, eos):
            self.generation_config = type("G", (), {"eos_token_id": eos})()

    assert rollout.end_token_ids(TOK, Gen([SEMI, EOS]), Gen(None), Gen(3)) == tuple(sorted({EOS, SEMI, 3}))
    no_eos = type("T", (), {"eos_token_id": None})()
    with pytest.raises(ValueError, match="neither the tokenizer nor the model's generation_config"):
        rollout.end_token_ids(no_eos, Gen(None))
    logits = torch.randn(2, 3, 10)
    assert rollout.real_token_logits(logits, None) is logits and rollout.real_token_logits(logits, 10) is logits
    assert rollout.real_token_logits(logits, 12) is logits
    assert torch.equal(rollout.real_token_logits(logits, 7), logits[..., :7])


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.8, 0.95, 1.0])
def test_top_p_filtering_equals_transformers_warper(top_p):
    from transformers import TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(7)) * 3
    logits[0, :3] = 10.0  # ties at the top
    logits[1] = 0.0  # uniform: the cumulative sums hit 1 - top_p exactly (0.5 for top_p 0.5)
    logits[2, :10] = 5.0  # a 3-D-free 2-D batch: softmax and cumsum along the vocabulary, not the rows
    want = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(rollout._filter_top_p(logits.clone(), top_p), want)


def test_a_clean_generation_config_is_neutral_apart_from_temperature_and_top_p():
    sampled = rollout.clean_generation_config(
        SamplingConfig(max_new_tokens=99, temperature=0.7, top_p=0.9), 12, PAD, (EOS, SEMI)
    )
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.max_new_tokens) == (True, 0.7, 0.9, 12)
    assert (sampled.top_k, sampled.repetition_penalty, sampled.no_repeat_ngram_size, sampled.num_beams) == (
        0,
        1.0,
        0,
        1,
    )
    assert sampled.eos_token_id == [EOS, SEMI] and sampled.pad_token_id == PAD and sampled.use_cache is True
    greedy = rollout.clean_generation_config(
        SamplingConfig(max_new_tokens=99, temperature=0.0, top_p=0.5), 3, PAD, (EOS,)
    )
    assert (greedy.do_sample, greedy.temperature, greedy.top_p) == (False, 1.0, 1.0)


def _tiny_gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    config = GPT2Config(vocab_size=len(TOK), n_positions=96, n_embd=32, n_layer=2, n_head=2, pad_token_id=PAD,
                        eos_token_id=EOS, bos_token_id=BOS)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)


# The decode-loop comparisons' models and teacher prefixes: rows that end early (a model that often draws the
# end token) and rows that run to their budget, rotary (Llama) and absolute (GPT-2) positions.
DECODE_CASE_PREFIXES = [[], TOK("3")["input_ids"], [], TOK("7;4;1")["input_ids"], [], TOK("1;")["input_ids"] + [EOS],
                        [], []]  # fmt: skip


def _decode_case_model(tmp_path, arch: str):
    if arch == "ending_llama":
        build_biased_llama(tmp_path / "m", TOK, {EOS: 1.0, SEMI: 0.5})
    elif arch == "llama":
        build_llama(tmp_path / "m", TOK, hidden=32, layers=2, heads=2, mlp=64, seed=11)
    else:
        _tiny_gpt2(tmp_path / "m")
    return load(tmp_path / "m")


@pytest.mark.parametrize("arch", ["ending_llama", "llama", "gpt2"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (0.0, 1.0)], ids=["t1", "t0.7_p0.8", "greedy"])
def test_asking_whether_all_rows_ended_every_16_tokens_gives_the_tokens_of_asking_every_token(
    tmp_path, arch, temperature, top_p
):
    """The decode loop asks the device whether every row has ended only every `check_every` tokens (16 on CUDA:
    each question is a host sync that drains an eager decode's launch queue); finished rows are fed pads in
    between and the trailing pad columns cut. Same seed: the same tokens, masks and width as asking every token,
    with and without teacher prefixes (row budgets), for rows that end early (a model that often draws the end
    token) and rows that run to their budget (rotary and absolute positions)."""
    lm = _decode_case_model(tmp_path, arch)
    ps, prefixes = prompts(), DECODE_CASE_PREFIXES
    sampling = SamplingConfig(max_new_tokens=40, temperature=temperature, top_p=top_p)
    runs = {}
    for every in (1, 16, 5):
        torch.manual_seed(4)
        runs[every] = rollout.sample(engine_for(lm, check_every=every), ps, prefixes, sampling, "cpu")
    for every in (16, 5):
        for field in ("input_ids", "attention_mask", "sampled", "prefix"):
            assert torch.equal(getattr(runs[every], field), getattr(runs[1], field)), (every, field)
    lengths = runs[1].sampled.sum(1).tolist()
    if arch == "ending_llama" and temperature > 0:  # rows end at different points, between the checks
        assert len(set(lengths)) > 3 and max(lengths) < 40, lengths
    with pytest.raises(ValueError, match=r"check_every=0: expected None or a number of tokens >= 1"):
        engine_for(lm, check_every=0)


@pytest.mark.parametrize("arch", ["ending_llama", "llama", "gpt2"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (0.0, 1.0)], ids=["t1", "t0.7_p0.8", "greedy"])
def test_the_preallocated_kv_cache_gives_the_tokens_of_transformers_dynamic_cache(
    tmp_path, arch, temperature, top_p, monkeypatch
):
    """The KV cache written in place (kv_cache.PreallocatedLayer, one buffer per layer for the prompt width
    plus the longest budget) against DynamicCache, which copies the cache at every token: the same seed gives
    the same tokens, masks and width, with and without teacher prefixes, rows ending early and running to
    their budgets, rotary (Llama) and absolute (GPT-2) positions. The preallocated layers are the ones used,
    each holding its buffer from the prefill on."""
    from tropd_ds import kv_cache

    lm = _decode_case_model(tmp_path, arch)
    ps, prefixes = prompts(), DECODE_CASE_PREFIXES
    sampling = SamplingConfig(max_new_tokens=40, temperature=temperature, top_p=top_p)
    made = []
    original = kv_cache.preallocated_cache
    monkeypatch.setattr(kv_cache, "preallocated_cache", lambda *a: made.append(original(*a)) or made[-1])
    runs = {}
    for preallocate in (False, True, False):
        torch.manual_seed(4)
        runs[preallocate] = rollout.sample(engine_for(lm, preallocate=preallocate), ps, prefixes, sampling, "cpu")
    for field in ("input_ids", "attention_mask", "sampled", "prefix"):
        assert torch.equal(getattr(runs[True], field), getattr(runs[False], field)), field
    assert len(made) == 1 and kv_cache.uses_preallocated(made[0])
    width = max(len(p.ids) + len(pre) for p, pre in zip(ps, prefixes))
    for layer in made[0].layers:
        assert layer.capacity == width + 40 and layer.key_buffer.shape[-2] == width + 40  # never grown
        assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()  # a view of the buffer, not a copy


def test_a_preallocated_layer_holds_what_a_dynamic_layer_holds_and_grows_past_its_capacity():
    from transformers.cache_utils import DynamicLayer

    from tropd_ds.kv_cache import PreallocatedLayer

    ours, theirs = PreallocatedLayer(capacity=6), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for n in (4, 1, 1, 3):  # a prefill, two tokens, then past the capacity of 6
        k, v = torch.randn(2, 3, n, 5, generator=g), torch.randn(2, 3, n, 5, generator=g)
        got, want = ours.update(k, v), theirs.update(k.clone(), v.clone())
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert ours.get_seq_length() == theirs.get_seq_length()
    assert ours.capacity == 12  # twice the capacity it outgrew
    with pytest.raises(ValueError, match=r"capacity=0: expected a number of positions >= 1"):
        PreallocatedLayer(capacity=0)


def test_a_model_with_sliding_window_layers_keeps_transformers_cache_and_its_tokens(tmp_path):
    """A Mistral-style config with a sliding window: its layers are DynamicSlidingWindowLayer, which the
    preallocated cache does not replace; generation runs on transformers' own cache, the same tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    from tropd_ds import kv_cache

    config = MistralConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=6, pad_token_id=PAD,
                           eos_token_id=EOS, bos_token_id=BOS)  # fmt: skip
    torch.manual_seed(3)
    MistralForCausalLM(config).save_pretrained(tmp_path / "m")
    lm = load(tmp_path / "m")
    cache = kv_cache.preallocated_cache(lm.config, 50)
    assert not kv_cache.uses_preallocated(cache) and len(cache.layers) == 2
    ps, sampling, runs = prompts(), SamplingConfig(max_new_tokens=20), {}
    for preallocate in (False, True):
        torch.manual_seed(5)
        runs[preallocate] = rollout.sample(engine_for(lm, preallocate=preallocate), ps, [[]] * len(ps), sampling, "cpu")
    assert torch.equal(runs[True].input_ids, runs[False].input_ids)
