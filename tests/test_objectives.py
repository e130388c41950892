"""Objectives of docs/METHOD.md: hand-made cases, each asserting one property."""

from __future__ import annotations

import math

import pytest
import torch
import tropd_kernels as tk

from tropd_ds.objectives import OBJECTIVES, StepOptions, loss_fn
from tropd_ds.rollout import draw_prefix_len, max_prefix_len


def hand_case(n=12, seed=0, all_trusted=False):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, generator=g) * 4 - 0.1
    lp_t = lp + (torch.rand(n, generator=g) * 2 if all_trusted else torch.randn(n, generator=g) * 3)
    terms = tk.TokenTerms(
        logprob=lp.clone().requires_grad_(),
        fkl=(torch.rand(n, generator=g) * 2).requires_grad_(),
        entropy=torch.rand(n, generator=g) * 3,
        topk_mass=torch.rand(n, generator=g),
    )
    teacher = tk.TeacherTopK(
        ids=torch.zeros(n, 4, dtype=torch.long),
        logprobs=torch.zeros(n, 4),
        target_logprob=lp_t,
        entropy=torch.rand(n, generator=g) * 1.6,
    )
    sampled = torch.ones(n, dtype=torch.bool)
    prefix = torch.zeros(n, dtype=torch.bool)
    return terms, teacher, sampled, prefix


def grads(out, terms):
    lp, fkl = torch.autograd.grad(out.loss, [terms.logprob, terms.fkl], allow_unused=True)
    return (torch.zeros_like(terms.logprob) if lp is None else lp), (
        torch.zeros_like(terms.fkl) if fkl is None else fkl
    )


def test_tropd_with_every_token_trusted_equals_opd():
    terms, teacher, sampled, prefix = hand_case(all_trusted=True)
    g = torch.Generator().manual_seed(0)
    tropd = loss_fn("tropd")(terms, teacher, sampled, prefix, 0, 10, g)
    opd = loss_fn("opd")(terms, teacher, sampled, prefix, 0, 10)
    assert tropd.metrics["trust_fraction"] == 1.0
    torch.testing.assert_close(tropd.loss, opd.loss)
    for a, b in zip(grads(tropd, terms), grads(opd, terms)):
        torch.testing.assert_close(a, b)


def test_expected_trust_equals_mean_of_bernoulli_draws():
    terms, teacher, sampled, prefix = hand_case(n=8, seed=3)
    expected = loss_fn("tropd", trust_mode="expected")(terms, teacher, sampled, prefix, 0, 10).loss
    bern = loss_fn("tropd", trust_mode="bernoulli")
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([bern(terms, teacher, sampled, prefix, 0, 10, g).loss.detach() for _ in range(4000)])
    stderr = draws.std() / math.sqrt(len(draws))
    assert abs(float(draws.mean() - expected.detach())) < 4 * float(stderr) + 1e-6
    assert draws.std() > 0  # the draws really vary


def test_bernoulli_trust_is_reproducible_with_a_seeded_generator():
    terms, teacher, sampled, prefix = hand_case(seed=4)
    obj = loss_fn("tropd")
    a = obj(terms, teacher, sampled, prefix, 0, 10, torch.Generator().manual_seed(7)).loss
    b = obj(terms, teacher, sampled, prefix, 0, 10, torch.Generator().manual_seed(7)).loss
    assert torch.equal(a, b)


def test_tokens_where_teacher_beats_student_are_always_trusted():
    terms, teacher, sampled, prefix = hand_case(seed=5)
    out = loss_fn("tropd", trust_mode="threshold", trust_tau=1.0)(terms, teacher, sampled, prefix, 0, 10)
    r = teacher.target_logprob - terms.logprob.detach()
    assert out.metrics["trust_fraction"] == pytest.approx(float((r >= 0).float().mean()))


def test_outlier_fkl_gradient_equals_autograd_on_the_formula():
    """All tokens outliers (threshold trust at 1, teacher below student): loss = mean FKL_t through the kernels."""
    g = torch.Generator().manual_seed(0)
    n, vocab, k = 9, 301, 8
    student = torch.randn(n, vocab, generator=g) * 2
    teacher_logits = torch.randn(n, vocab, generator=g) * 2
    targets = student.argmax(1)  # student's favourite token: the teacher likes it less
    teacher = tk.teacher_topk(teacher_logits, targets, k)
    teacher = teacher._replace(target_logprob=torch.full((n,), -30.0))
    z = student.clone().requires_grad_()
    terms = tk.token_terms(z, targets, teacher, logprob_floor=-10.0)
    sampled, prefix = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    out = loss_fn("tropd", trust_mode="threshold", trust_tau=1.0, logprob_floor=-10.0)(
        terms, teacher, sampled, prefix, 0, 1
    )
    assert out.metrics["trust_fraction"] == 0.0
    out.loss.backward()
    # the formula, written out: sum_{v in K} q (log q - max(lp_S(v), floor)), token mean
    z2 = student.clone().requires_grad_()
    lp_s = torch.log_softmax(z2, 1).gather(1, teacher.ids).clamp(min=-10.0)
    q = teacher.logprobs.exp()
    (q * (teacher.logprobs - lp_s)).sum(1).mean().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["opd", "tropd"])
def test_opd_gradient_averaged_over_the_students_own_samples_is_the_reverse_kl_gradient(name):
    """The one-sample K1 estimator through the kernels, averaged exactly over every token the student could
    sample (weights p_S), is the gradient of the full reverse KL(p_S || p_T): the policy-gradient rows of
    docs/RESULTS.md optimise the right thing, only noisily. TrOPD with every token trusted is the same."""
    g = torch.Generator().manual_seed(12)
    n, vocab = 5, 37
    student = torch.randn(n, vocab, generator=g) * 2
    teacher_logits = torch.randn(n, vocab, generator=g) * 2
    if name == "tropd":  # a teacher above the student on every token: every token trusted
        teacher_logits = torch.log_softmax(student, 1) + torch.rand(n, vocab, generator=g) * 0.01
    sampled, prefix = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    obj = loss_fn(name, k=4) if name == "tropd" else loss_fn(name)
    p_s = torch.softmax(student, 1)
    expected = torch.zeros(n, vocab)
    for v in range(vocab):  # every position samples token v; weight each position's gradient by p_S(v)
        targets = torch.full((n,), v)
        teacher = tk.teacher_topk(teacher_logits, targets, 4)
        z = student.clone().requires_grad_()
        terms = tk.token_terms(z, targets, teacher, options=obj.step_options().kernel)
        out = obj(terms, teacher, sampled, prefix, 0, 1, torch.Generator().manual_seed(0))
        if name == "tropd":
            assert out.metrics["trust_fraction"] == 1.0
        (grad,) = torch.autograd.grad(out.loss, z)
        expected += p_s[:, v : v + 1] * grad
    z = student.clone().requires_grad_()
    lp_s, lp_t = torch.log_softmax(z, 1), torch.log_softmax(teacher_logits, 1)
    (lp_s.exp() * (lp_s - lp_t)).sum(1).mean().backward()  # reverse KL, token mean
    torch.testing.assert_close(expected, z.grad, rtol=1e-4, atol=1e-6)


def test_clip_outlier_equals_single_stage_reopold_with_the_same_floor():
    terms, teacher, sampled, prefix = hand_case(seed=6)
    lam = 0.3
    c = math.log(lam / (1 - lam))
    clip = loss_fn("clip_outlier", tau=c)(terms, teacher, sampled, prefix, 5, 10)
    reo = loss_fn("reopold", reopold_lambda=lam, reopold_stages=1)(terms, teacher, sampled, prefix, 5, 10)
    torch.testing.assert_close(clip.loss, reo.loss)
    for a, b in zip(grads(clip, terms), grads(reo, terms)):
        torch.testing.assert_close(a, b)
    assert clip.metrics["fraction_clipped"] > 0  # the floor really bites in this case


def test_mask_outlier_drops_exactly_the_tokens_below_tau():
    terms, teacher, sampled, prefix = hand_case(seed=7)
    out = loss_fn("mask_outlier", tau=-1.0)(terms, teacher, sampled, prefix, 0, 1)
    r = teacher.target_logprob - terms.logprob.detach()
    g_lp, _ = grads(out, terms)
    assert torch.all((g_lp == 0) == (r <= -1.0))
    torch.testing.assert_close(g_lp[r > -1.0], -r[r > -1.0] / len(r))


def test_eopd_adds_fkl_only_where_teacher_entropy_exceeds_threshold():
    terms, teacher, sampled, prefix = hand_case(seed=8)
    eopd = loss_fn("eopd")(terms, teacher, sampled, prefix, 0, 1)
    opd = loss_fn("opd")(terms, teacher, sampled, prefix, 0, 1)
    gate = teacher.entropy > 0.8
    assert 0 < int(gate.sum()) < len(gate)
    torch.testing.assert_close(eopd.loss - opd.loss, terms.fkl[gate].sum() / len(gate))
    _, g_fkl = grads(eopd, terms)
    assert torch.all((g_fkl != 0) == gate)
    assert loss_fn("eopd").step_options() == StepOptions(16, tk.KernelOptions(1.0, "renorm", None, None))


def test_reopold_changes_its_token_selection_at_the_switch_step():
    terms, teacher, sampled, prefix = hand_case(n=40, seed=9)
    obj = loss_fn("reopold")
    before = obj(terms, teacher, sampled, prefix, 49, 100)
    after = obj(terms, teacher, sampled, prefix, 50, 100)
    r = teacher.target_logprob - terms.logprob.detach()
    c = math.log(0.2 / 0.8)
    assert before.metrics["fraction_selected"] == pytest.approx(float((r >= c).float().mean()))
    assert after.metrics["fraction_selected"] == pytest.approx(0.5)  # top 50% by student entropy
    g_before, _ = grads(obj(terms, teacher, sampled, prefix, 49, 100), terms)
    g_after, _ = grads(after, terms)
    assert not torch.equal(g_before != 0, g_after != 0)
    top = torch.zeros(40, dtype=torch.bool)
    top[terms.entropy.topk(20).indices] = True
    assert torch.all((g_after != 0) == top)


def test_entropy_opd_trains_only_the_highest_entropy_fifth():
    terms, teacher, sampled, prefix = hand_case(n=20, seed=10)
    out = loss_fn("entropy_opd")(terms, teacher, sampled, prefix, 0, 1)
    g_lp, _ = grads(out, terms)
    top4 = terms.entropy.topk(4).indices
    assert set((g_lp != 0).nonzero().squeeze(1).tolist()) == set(top4.tolist())


def test_fkl_topk_with_tail_mode_is_never_negative():
    g = torch.Generator().manual_seed(1)
    teacher_logits = torch.randn(30, 500, generator=g) * 3
    targets = torch.randint(0, 500, (30,), generator=g)
    teacher = tk.teacher_topk(teacher_logits, targets, 8)
    obj = loss_fn("fkl_topk", fkl_mode="tail", k=8)
    for scale in (0.5, 1.5, 3.0):  # students flatter and sharper than the teacher
        terms = tk.token_terms(teacher_logits * scale, targets, teacher, options=obj.step_options().kernel)
        assert terms.fkl.min() >= -1e-6
        out = obj(terms, teacher, torch.ones(30, dtype=torch.bool), torch.zeros(30, dtype=torch.bool), 0, 1)
        assert out.loss >= 0


def test_jsd_objective_asks_the_kernels_for_the_jsd_and_averages_it_over_sampled_tokens():
    g = torch.Generator().manual_seed(2)
    teacher_logits, student_logits = torch.randn(20, 60, generator=g) * 2, torch.randn(20, 60, generator=g)
    targets = torch.randint(0, 60, (20,), generator=g)
    teacher = tk.teacher_topk(teacher_logits, targets, 60)
    obj = loss_fn("jsd", k=60, jsd_beta=0.3)
    options = obj.step_options(0, 1, temperature=0.8)
    assert (options.k, options.kernel.divergence, options.kernel.jsd_beta) == (60, "jsd", 0.3)
    assert options.kernel.temperature == 0.8
    terms = tk.token_terms(student_logits, targets, teacher, options=options.kernel)
    want = tk.token_terms_oracle(student_logits, targets, teacher, 0.8, "paper", None, None, "jsd", 0.3).fkl
    sampled = torch.arange(20) % 3 != 0
    prefix = ~sampled
    out = obj(terms, teacher, sampled, prefix, 0, 1)
    torch.testing.assert_close(out.loss, want[sampled].sum() / 20)  # token mean over sampled and prefix tokens
    with pytest.raises(ValueError, match="logprob_floor=-4.0 with divergence='jsd'"):
        loss_fn("jsd", logprob_floor=-4.0)
    with pytest.raises(ValueError, match=r"jsd_beta=1.5: expected a number in \(0, 1\)"):
        loss_fn("jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="option 'jsd_beta' does not apply to objective 'tropd'"):
        loss_fn("tropd", jsd_beta=0.5)


def test_guidance_tokens_receive_exactly_beta_times_minus_logprob():
    terms, teacher, sampled, prefix = hand_case(n=10, seed=11)
    prefix = torch.zeros(10, dtype=torch.bool)
    prefix[:4] = True
    sampled = ~prefix
    out = loss_fn("tropd", beta=0.01, trust_mode="expected")(terms, teacher, sampled, prefix, 0, 1)
    g_lp, g_fkl = grads(out, terms)
    torch.testing.assert_close(g_lp[:4], torch.full((4,), -0.01 / 10))
    assert torch.all(g_fkl[:4] == 0)  # no FKL, no trust mask on prefix tokens
    torch.testing.assert_close(
        torch.tensor(out.metrics["loss_guidance"]), (0.01 * -terms.logprob[:4]).sum().detach() / 10
    )


@pytest.mark.parametrize("name", OBJECTIVES)
def test_micro_batches_with_the_global_token_count_sum_to_the_full_batch_gradient(name):
    terms, teacher, sampled, prefix = hand_case(n=24, seed=12)
    prefix = torch.zeros(24, dtype=torch.bool)
    prefix[::5] = True
    sampled = ~prefix
    kwargs = {"trust_mode": "expected"} if name == "tropd" else {}
    obj = loss_fn(name, **kwargs)
    step, total = (70, 100) if name == "reopold" else (0, 1)
    r = teacher.target_logprob - terms.logprob.detach()
    stats = obj.batch_statistics(terms.entropy, r, sampled, step, total)
    full = obj(terms, teacher, sampled, prefix, step, total, **stats)
    g_full = grads(full, terms)
    g_sum = [torch.zeros(24), torch.zeros(24)]
    for part in (slice(0, 7), slice(7, 24)):
        sub_terms = tk.TokenTerms(*(t[part] for t in terms))
        sub_teacher = tk.TeacherTopK(*(t[part] for t in teacher))
        out = obj(sub_terms, sub_teacher, sampled[part], prefix[part], step, total, token_count=24, **stats)
        lp_g, fkl_g = torch.autograd.grad(out.loss, [terms.logprob, terms.fkl], allow_unused=True)
        g_sum[0] += 0 if lp_g is None else lp_g
        g_sum[1] += 0 if fkl_g is None else fkl_g
    for a, b in zip(g_sum, g_full):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_batch_without_sampled_tokens_gives_a_zero_loss_that_backpropagates(name):
    terms, teacher, _, _ = hand_case(n=6, seed=13)
    none = torch.zeros(6, dtype=torch.bool)
    out = loss_fn(name)(terms, teacher, none, none, 0, 1, torch.Generator().manual_seed(0))
    assert out.loss.item() == 0 and not math.isnan(out.loss.item())
    out.loss.backward()
    assert terms.logprob.grad is None or not torch.isnan(terms.logprob.grad).any()


def test_ppo_ratio_with_old_logprobs_equal_to_current_gives_the_plain_gradient():
    terms, teacher, sampled, prefix = hand_case(seed=14)
    plain = loss_fn("opd")(terms, teacher, sampled, prefix, 0, 1)
    ppo = loss_fn("opd", ppo_clip=0.2)(terms, teacher, sampled, prefix, 0, 1, old_logprob=terms.logprob.detach())
    torch.testing.assert_close(grads(plain, terms)[0], grads(ppo, terms)[0])
    with pytest.raises(ValueError, match="old_logprob is None"):
        loss_fn("opd", ppo_clip=0.2)(terms, teacher, sampled, prefix, 0, 1)


def test_k_and_coverage_schedules():
    obj = loss_fn("tropd", k=64, k_end=16, fkl_cover=0.9, cover_end=0.5)
    assert obj.step_options(0, 100).k == 64 and obj.step_options(100, 100).k == 16
    assert obj.step_options(50, 100).kernel.fkl_cover == pytest.approx(0.7)
    assert [obj.step_options(s, 2).k for s in (-1, 0, 1, 2, 3)] == [64, 64, 40, 16, 16]  # clamped to [0, total]
    assert obj.step_options(1, 1).k == 16 and obj.step_options(0, 0).k == 64
    fixed = loss_fn("tropd", fkl_cover=0.8, logprob_floor=-20.0).step_options(7, 10, temperature=0.6)
    assert (fixed.k, fixed.kernel) == (64, tk.KernelOptions(0.6, "paper", -20.0, 0.8))  # no cover_end: fixed
    jsd = loss_fn("jsd", fkl_cover=0.9, jsd_beta=0.3).step_options(0, 10, temperature=0.8)
    assert jsd.kernel == tk.KernelOptions(0.8, "paper", None, 0.9, "jsd", 0.3)
    assert loss_fn("opd").step_options(3, 10, temperature=0.7) == StepOptions(1, tk.KernelOptions(0.7))


def test_objectives_without_a_topk_term_ask_the_teacher_for_k_1():
    for name in ("opd", "mask_outlier", "clip_outlier", "reopold", "entropy_opd"):
        assert loss_fn(name).step_options().k == 1 and loss_fn(name).max_k() == 1
    assert loss_fn("tropd").max_k() == 64 and loss_fn("tropd", k=8, k_end=32).max_k() == 32
    assert loss_fn("eopd").max_k() == 16


def test_guidance_schedule_is_cosine_from_l_max_to_zero_and_draws_are_seeded():
    assert max_prefix_len(0, 200, 100) == 100
    assert max_prefix_len(100, 200, 100) == 50
    assert max_prefix_len(200, 200, 100) == 0
    lens = [max_prefix_len(s, 200, 100) for s in range(201)]
    assert all(a >= b for a, b in zip(lens, lens[1:]))
    a = [draw_prefix_len(10, 200, 100, 40, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert len(set(a)) == 1
    g = torch.Generator().manual_seed(0)
    draws = [draw_prefix_len(10, 200, 100, 40, g) for _ in range(500)]
    assert min(draws) == 0 and max(draws) == 40  # capped by the response length
    assert all(draw_prefix_len(200, 200, 100, 40, g) == 0 for _ in range(20))


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("gkd", {}, r"objective name='gkd': expected one of opd, tropd"),
        ("tropd", {"betta": 0.1}, r"unknown option 'betta'"),
        ("opd", {"beta": 0.1}, r"option 'beta' does not apply to objective 'opd'"),
        ("tropd", {"beta": -0.1}, r"beta=-0.1: expected a number >= 0"),
        ("reopold", {"reopold_lambda": 1.0}, r"reopold_lambda=1.0: expected a number in \(0, 1\)"),
        ("reopold", {"reopold_lambda": 0.0}, r"reopold_lambda=0.0"),
        ("entropy_opd", {"entropy_fraction": 0.0}, r"entropy_fraction=0.0: expected a number in \(0, 1\]"),
        ("entropy_opd", {"entropy_fraction": 1.5}, r"entropy_fraction=1.5"),
        ("mask_outlier", {"tau": float("nan")}, r"tau=nan: expected a number"),
        ("tropd", {"trust_mode": "always"}, r"trust_mode='always': expected one of bernoulli, expected, threshold"),
        ("tropd", {"outlier": "drop"}, r"outlier='drop'"),
        ("tropd", {"k": 0}, r"k=0: expected an integer >= 1"),
        ("tropd", {"fkl_cover": 1.2}, r"fkl_cover=1.2"),
        ("tropd", {"cover_end": 0.5}, r"cover_end is set but fkl_cover is None"),
        ("reopold", {"reopold_stages": 3}, r"reopold_stages=3: expected 1 or 2"),
        ("opd", {"ppo_clip": 1.5}, r"ppo_clip=1.5"),
    ],
)
def test_bad_options_name_the_option_the_value_and_what_is_accepted(name, options, match):
    with pytest.raises(ValueError, match=match):
        loss_fn(name, **options)


# ----------------------------------------------------------------------------- edges found by mutation testing


def ppo_case(n=12, seed=21):
    """hand_case with rollout-time log-probs one nat above the current ones for half the tokens (ratio e^-1,
    below 1 - 0.2) and one nat below for the other half (ratio e, above 1 + 0.2), rewards of both signs."""
    terms, teacher, sampled, prefix = hand_case(n=n, seed=seed)
    shift = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    return terms, teacher, sampled, prefix, terms.logprob.detach() + shift


def ppo_pg(lp, old, reward, eps=0.2):
    ratio = torch.exp(lp - old)
    return -torch.minimum(ratio * reward, ratio.clamp(1 - eps, 1 + eps) * reward)


PPO_REFERENCES = {  # name, options -> per-token loss and denominator, from docs/METHOD.md's table
    "opd": ({}, lambda lp, old, r, t: (ppo_pg(lp, old, r), len(r))),
    "mask_outlier": ({"tau": -1.0}, lambda lp, old, r, t: ((r > -1.0) * ppo_pg(lp, old, r), len(r))),
    "clip_outlier": ({"tau": -1.0}, lambda lp, old, r, t: (ppo_pg(lp, old, r.clamp(min=-1.0)), len(r))),
    "reopold": (
        {},
        lambda lp, old, r, t: (
            (r >= math.log(0.25)) * ppo_pg(lp, old, r.clamp(min=math.log(0.25))),
            float((r >= math.log(0.25)).sum()),
        ),
    ),
    "eopd": ({}, lambda lp, old, r, t: (ppo_pg(lp, old, r) + (t.teacher.entropy > 0.8) * t.terms.fkl, len(r))),
    "tropd": (
        {"trust_mode": "expected", "outlier": "clip", "tau": -1.0},
        lambda lp, old, r, t: (
            torch.exp(r.clamp(max=0)) * ppo_pg(lp, old, r)
            + (1 - torch.exp(r.clamp(max=0))) * ppo_pg(lp, old, r.clamp(min=-1.0)),
            len(r),
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(PPO_REFERENCES))
def test_every_policy_gradient_objective_uses_the_clipped_ratio_when_ppo_clip_is_set(name):
    """Each PG term of each objective (TrOPD's trusted and clipped-outlier terms both) takes the PPO form."""
    options, reference = PPO_REFERENCES[name]
    terms, teacher, sampled, prefix, old = ppo_case()
    out = loss_fn(name, ppo_clip=0.2, **options)(terms, teacher, sampled, prefix, 0, 10, old_logprob=old)
    r = (teacher.target_logprob - terms.logprob).detach()
    per_token, denom = reference(terms.logprob, old, r, type("T", (), {"teacher": teacher, "terms": terms}))
    want = per_token.sum() / denom
    torch.testing.assert_close(out.loss, want)
    got = grads(out, terms)[0]
    torch.testing.assert_close(got, torch.autograd.grad(want, terms.logprob)[0])
    plain = loss_fn(name, **options)(terms, teacher, sampled, prefix, 0, 10)
    assert not torch.allclose(grads(plain, terms)[0], got)  # the ratio matters here


def test_entropy_opd_uses_the_clipped_ratio_and_the_batchs_threshold():
    terms, teacher, sampled, prefix, old = ppo_case()
    threshold = float(terms.entropy.sort().values[-5])  # a global threshold keeping this rank's top 5 (not 3 of 12)
    out = loss_fn("entropy_opd", ppo_clip=0.2)(
        terms, teacher, sampled, prefix, 0, 10, old_logprob=old, entropy_threshold=threshold
    )
    r = (teacher.target_logprob - terms.logprob).detach()
    want = ((terms.entropy >= threshold) * ppo_pg(terms.logprob, old, r)).sum() / len(r)
    torch.testing.assert_close(out.loss, want)
    assert out.metrics["fraction_selected"] == 5 / len(r)


def tie_case(r_values, entropy=None, teacher_entropy=None):
    """Sampled tokens with these exact log-ratios (lp_S = 0, so r = lp_T with no rounding)."""
    r = torch.tensor(r_values, dtype=torch.float32)
    n = len(r)
    terms = tk.TokenTerms(
        logprob=torch.zeros(n, requires_grad=True),
        fkl=torch.ones(n, requires_grad=True),
        entropy=torch.ones(n) if entropy is None else torch.tensor(entropy),
        topk_mass=torch.ones(n),
    )
    teacher = tk.TeacherTopK(
        ids=torch.zeros(n, 1, dtype=torch.long),
        logprobs=torch.zeros(n, 1),
        target_logprob=r,
        entropy=torch.zeros(n) if teacher_entropy is None else torch.tensor(teacher_entropy),
    )
    return terms, teacher, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)


def test_thresholds_treat_a_tie_as_the_algorithm_says():
    """r_t > tau keeps (mask_outlier), max(r_t, tau) clips only below tau, REOPOLD's r_t >= c selects,
    EOPD's H_T > 0.8 adds FKL: a token exactly at the threshold falls on the side docs/METHOD.md gives."""
    case = tie_case([-1.0, -0.5, -2.0])
    masked = loss_fn("mask_outlier", tau=-1.0)(*case, 0, 10)
    assert masked.metrics["fraction_masked"] == pytest.approx(2 / 3)  # -1.0 and -2.0 are not > -1.0
    clipped = loss_fn("clip_outlier", tau=-1.0)(*case, 0, 10)
    assert clipped.metrics["fraction_clipped"] == pytest.approx(1 / 3)  # only -2.0 is below -1.0
    c = float(torch.tensor(math.log(0.2 / 0.8)))  # REOPOLD's floor, as the float32 log-ratios see it
    case = tie_case([c, c - 0.5, 0.0])
    selected = loss_fn("reopold")(*case, 0, 10)
    assert selected.metrics["fraction_selected"] == pytest.approx(2 / 3)  # c itself is selected
    assert selected.metrics["fraction_clipped"] == pytest.approx(1 / 3)  # c itself is not clipped
    gated = loss_fn("eopd")(*tie_case([0.0, 0.0], teacher_entropy=[0.8, 0.81]), 0, 10)
    assert gated.metrics["fraction_fkl"] == 0.5  # 0.8 is not > 0.8


def test_a_single_sampled_token_is_a_whole_fraction_and_the_top_fraction_keeps_at_least_one():
    from tropd_ds.objectives import top_fraction_threshold

    one = loss_fn("mask_outlier", tau=-1.0)(*tie_case([0.5]), 0, 10)
    assert one.metrics["fraction_masked"] == 0.0  # kept: 1 of 1, not 1 of max(1, 2)
    values = torch.arange(10.0)
    assert top_fraction_threshold(values, 0.05) == 9.0  # ceil(0.5) = 1 value kept
    assert top_fraction_threshold(values, 0.2) == 8.0
    assert top_fraction_threshold(values, 0.25) == 7.0  # ceil(2.5) = 3 values kept, not round or floor
    assert top_fraction_threshold(torch.empty(0), 0.5) == float("inf")


def test_reopold_divides_by_the_global_selection_count_and_takes_the_global_threshold_in_stage_2():
    terms, teacher, sampled, prefix = hand_case(n=12, seed=22)
    reopold = loss_fn("reopold")
    r = (teacher.target_logprob - terms.logprob).detach()
    c = math.log(0.25)
    m = (r >= c).float()
    per_token = m * -(r.clamp(min=c)) * terms.logprob
    stage1 = reopold(terms, teacher, sampled, prefix, 0, 10, selection_count=40.0)  # 40 selected on all ranks
    torch.testing.assert_close(stage1.loss, per_token.sum() / 40.0)
    threshold = float(terms.entropy.sort().values[-2])  # the global stage-2 threshold keeps 2 of these
    stage2 = reopold(terms, teacher, sampled, prefix, 9, 10, selection_count=5.0, entropy_threshold=threshold)
    m2 = (terms.entropy >= threshold).float()
    torch.testing.assert_close(stage2.loss, (m2 * -(r.clamp(min=c)) * terms.logprob).sum() / 5.0)


def test_batch_statistics_are_the_thresholds_and_counts_the_losses_take():
    from tropd_ds.objectives import top_fraction_threshold

    terms, teacher, sampled, _ = hand_case(n=20, seed=23)
    entropy, r = terms.entropy, (teacher.target_logprob - terms.logprob).detach()
    sampled = sampled.clone()
    sampled[:4] = False
    stats = loss_fn("entropy_opd").batch_statistics(entropy, r, sampled, 0, 10)
    assert stats == {"entropy_threshold": float(top_fraction_threshold(entropy[sampled], 0.2))}
    stage1 = loss_fn("reopold").batch_statistics(entropy, r, sampled, 0, 10)
    assert stage1 == {"selection_count": float((sampled & (r >= math.log(0.25))).sum())}
    stage2 = loss_fn("reopold").batch_statistics(entropy, r, sampled, 9, 10)
    threshold = float(top_fraction_threshold(entropy[sampled], 0.5))
    assert stage2 == {
        "selection_count": float((sampled & (entropy >= threshold)).sum()),
        "entropy_threshold": threshold,
    }
    for name in ("opd", "tropd", "eopd", "mask_outlier"):
        assert loss_fn(name).batch_statistics(entropy, r, sampled, 0, 10) == {}


def test_tropd_parts_and_metrics_by_hand_with_a_prefix_token_and_each_outlier_term():
    """3 sampled tokens and 1 teacher-prefix token, expected trust: every part and metric from the formulas."""
    lp = torch.tensor([-0.5, -0.25, -1.0, -0.75])
    r = torch.tensor([0.5, -1.0, -2.0, 0.0])
    fkl = torch.tensor([0.2, 0.4, 0.8, 1.6])
    terms = tk.TokenTerms(logprob=lp.clone().requires_grad_(), fkl=fkl, entropy=torch.ones(4), topk_mass=torch.ones(4))
    teacher = tk.TeacherTopK(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1), lp + r, torch.zeros(4))
    sampled, prefix = torch.tensor([True, True, True, False]), torch.tensor([False, False, False, True])
    rs, lps = r[:3], lp[:3]
    m = torch.exp(rs.clamp(max=0))  # P_trust = min(e^r, 1) on S
    outliers = {"fkl": fkl[:3], "mask": torch.zeros(3), "clip": -(rs.clamp(min=-1.5)) * lps}
    for outlier, out in outliers.items():
        objective = loss_fn("tropd", trust_mode="expected", outlier=outlier, tau=-1.5, beta=0.25)
        got = objective(terms, teacher, sampled, prefix, 0, 10)
        trusted, outlier_part = float((m * -rs * lps).sum()), float(((1 - m) * out).sum())
        guidance = 0.25 * 0.75  # beta x -lp on the prefix token
        assert float(got.loss) == pytest.approx((trusted + outlier_part + guidance) / 4)
        want = {
            "trust_fraction": float(m.sum()) / 3,  # over the 3 sampled tokens; the prefix token is not counted
            "loss_trusted": trusted / 4,
            "loss_outlier": outlier_part / 4,
            "loss_guidance": guidance / 4,
            "outlier_fkl_mean": float(((1 - m) * fkl[:3]).sum() / (1 - m).sum()),
        }
        assert {k: got.metrics[k] for k in want} == pytest.approx(want, rel=1e-6), outlier
    one = loss_fn("tropd", trust_mode="expected")(*tie_case([-1.0]), 0, 10)
    assert one.metrics["trust_fraction"] == pytest.approx(math.exp(-1.0))  # 1 sampled token: divided by 1


def test_bernoulli_trust_without_a_generator_draws_from_torch_global_generator():
    terms, teacher, sampled, prefix = hand_case(n=64, seed=24)
    torch.manual_seed(5)
    a = loss_fn("tropd")(terms, teacher, sampled, prefix, 0, 10, None)
    torch.manual_seed(5)
    b = loss_fn("tropd")(terms, teacher, sampled, prefix, 0, 10, None)
    assert a.metrics["trust_fraction"] == b.metrics["trust_fraction"] and 0 < a.metrics["trust_fraction"] < 1
    fractions = set()
    for seed in range(6):  # another global seed, other draws: the draws come from torch's global generator
        torch.manual_seed(seed)
        fractions.add(loss_fn("tropd")(terms, teacher, sampled, prefix, 0, 10, None).metrics["trust_fraction"])
    assert len(fractions) > 1


def test_common_metrics_by_hand():
    """docs/METHOD.md's per-step metrics over the sampled tokens only, quantiles as numpy takes them."""
    import numpy as np

    lp = torch.tensor([-0.5, -0.25, -1.0, -0.75, -2.0])
    r = torch.tensor([0.5, -1.0, -2.0, 0.25, -3.0])
    terms = tk.TokenTerms(
        logprob=lp, fkl=torch.tensor([0.2, 0.4, 0.8, 1.6, 3.2]), entropy=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]),
        topk_mass=torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
    )  # fmt: skip
    teacher = tk.TeacherTopK(torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 1), lp + r, torch.arange(5.0))
    sampled, prefix = torch.tensor([True, True, True, True, False]), torch.tensor([False] * 4 + [True])
    got = loss_fn("opd")(terms, teacher, sampled, prefix, 0, 10).metrics
    rs = np.array([0.5, -1.0, -2.0, 0.25])
    want = {
        "loss": float((-torch.tensor(rs) * lp[:4].double()).sum() / 5),  # sampled | prefix: 5 tokens
        "sampled_tokens": 4.0,
        "prefix_tokens": 1.0,
        "log_ratio_mean": rs.mean(),
        "log_ratio_p1": np.quantile(rs, 0.01),
        "log_ratio_p10": np.quantile(rs, 0.10),
        "fkl_mean": (0.2 + 0.4 + 0.8 + 1.6) / 4,
        "topk_mass_mean": (0.9 + 0.8 + 0.7 + 0.6) / 4,
        "student_entropy_mean": 2.5,
        "teacher_entropy_mean": 1.5,
    }
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6)
    one = loss_fn("opd")(*tie_case([-0.5]), 0, 10).metrics  # one sampled token: both quantiles are its r
    assert (one["log_ratio_p1"], one["log_ratio_p10"], one["loss"]) == (-0.5, -0.5, 0.0)
    none = loss_fn("opd")(terms, teacher, torch.zeros(5, dtype=torch.bool), prefix, 0, 10).metrics
    assert "log_ratio_mean" not in none and none["sampled_tokens"] == 0.0


def test_a_single_token_is_divided_by_one_and_a_missing_old_logprob_is_named():
    terms, teacher, sampled, prefix = tie_case([-0.5])
    terms = terms._replace(logprob=torch.tensor([-2.0], requires_grad=True))
    teacher = teacher._replace(target_logprob=torch.tensor([-2.5]))
    assert float(loss_fn("opd")(terms, teacher, sampled, prefix, 0, 10).loss) == pytest.approx(0.5 * -2.0)
    reopold = loss_fn("reopold")(terms, teacher, sampled, prefix, 0, 10, selection_count=1.0)
    assert float(reopold.loss) == pytest.approx(0.5 * -2.0)  # r = -0.5 >= c: selected, one token, divided by 1
    with pytest.raises(ValueError) as missing:
        loss_fn("opd", ppo_clip=0.2)(terms, teacher, sampled, prefix, 0, 10)
    assert str(missing.value) == "ppo_clip is set but old_logprob is None: pass the rollout-time student log-probs"
