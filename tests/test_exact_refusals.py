"""Every check's refusal word for word and its boundary values, and the edges of the small helpers the loss,
the rollout and the kernels rely on: what the mutation run (docs/TESTING.md) found that no test pinned."""

from __future__ import annotations

import math
import re

import pytest
import torch
import tropd_kernels as tk

from tropd_ds.config import ConfigError, parse_file
from tropd_ds.objectives import Tokens, loss_fn
from tropd_ds.rollout import end_token_ids


def test_a_yaml_file_that_cannot_be_read_names_the_file_and_the_reader_problem(tmp_path):
    """A control character is a yaml ReaderError: no problem_mark, problem or context attribute."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  steps: 3\x07\n")
    with pytest.raises(ConfigError) as err:
        parse_file(path)
    message = str(err.value)
    assert (
        message == f"{path}:2:11: YAML syntax error: unacceptable character #x0007: special characters are not allowed"
    )


def test_a_reader_error_counts_lines_and_columns_from_the_start_of_the_text(tmp_path):
    """The line and column of a ReaderError, counted from the text's start up to the character. Kills
    config.x_parse_file__mutmut_52 (count("\\n", position): the newlines after it, line 2), 67 (find for rfind: the
    first newline, column 18), 55 (count from index 1: the newline at index 0 missed, line 1) and 70 (rfind from
    index 1: column 9). Two texts: 67 needs two newlines before the character, 55 and 70 one at index 0."""
    tail = "YAML syntax error: unacceptable character #x0007: special characters are not allowed"
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\noptim:\n  steps: 3\x07\n")
    with pytest.raises(ConfigError) as err:
        parse_file(path)
    assert str(err.value) == f"{path}:3:11: {tail}"
    path.write_text("\nseed: 1\x07\n")
    with pytest.raises(ConfigError) as err:
        parse_file(path)
    assert str(err.value) == f"{path}:2:8: {tail}"


def test_counts_accept_one_and_the_coverage_schedule_and_floor_their_edges():
    assert loss_fn("tropd", k=1).options.k == 1 and loss_fn("tropd", k=4, k_end=1).options.k_end == 1
    assert loss_fn("tropd", fkl_cover=1.0).options.fkl_cover == 1.0  # (0, 1]: 1 is allowed
    assert loss_fn("tropd", logprob_floor=0.0).options.logprob_floor == 0.0  # <= 0: 0 is allowed
    with pytest.raises(ValueError, match=r"logprob_floor=0.5"):
        loss_fn("tropd", logprob_floor=0.5)
    with pytest.raises(ValueError) as err:
        loss_fn("tropd", cover_end=0.5)
    assert (
        str(err.value) == "cover_end is set but fkl_cover is None: a coverage schedule needs its start value fkl_cover"
    )


def test_option_refusals_list_the_accepted_options_word_for_word():
    with pytest.raises(ValueError) as err:
        loss_fn("opd", kk=3)
    assert str(err.value) == "unknown option 'kk' for objective 'opd': accepted options are ppo_clip"
    with pytest.raises(ValueError) as err:
        loss_fn("opd", k=3)
    assert str(err.value) == "option 'k' does not apply to objective 'opd': accepted options are ppo_clip"


def test_option_refusals_join_two_accepted_options_with_a_comma():
    """An objective with two options: kills objectives.x_loss_fn__mutmut_20 and 24 ('XX, XX'.join(accepted), which
    a single option, joined without a separator, does not show)."""
    with pytest.raises(ValueError) as err:
        loss_fn("mask_outlier", kk=3)
    assert str(err.value) == "unknown option 'kk' for objective 'mask_outlier': accepted options are ppo_clip, tau"
    with pytest.raises(ValueError) as err:
        loss_fn("mask_outlier", k=3)
    assert str(err.value) == (
        "option 'k' does not apply to objective 'mask_outlier': accepted options are ppo_clip, tau"
    )


def _tokens(sampled, lp, lp_teacher):
    n = len(lp)
    terms = tk.TokenTerms(torch.tensor(lp), torch.zeros(n), torch.zeros(n), torch.ones(n))
    teacher = tk.TeacherTopK(torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), torch.tensor(lp_teacher),
                             torch.zeros(n))  # fmt: skip
    return terms, teacher, torch.tensor(sampled), torch.zeros(n, dtype=torch.bool)


def test_the_log_ratio_is_zero_off_the_sampled_tokens():
    terms, teacher, sampled, prefix = _tokens([True, False], [-1.0, -2.0], [-0.5, -0.2])
    x = Tokens(terms, teacher, sampled, prefix, 0, 1, None, None, None, None)
    assert x.r.tolist() == [0.5, 0.0]


def test_the_log_ratio_quantiles_of_two_tokens_interpolate_between_them():
    terms, teacher, sampled, prefix = _tokens([True, True], [-1.0, -1.0], [-1.0, 0.0])  # r = 0 and 1
    metrics = loss_fn("opd")(terms, teacher, sampled, prefix, 0, 1).metrics
    assert metrics["log_ratio_p1"] == pytest.approx(0.01) and metrics["log_ratio_p10"] == pytest.approx(0.10)


def test_the_outliers_mean_fkl_divides_by_their_expected_mass_even_below_one_token():
    """Expected trust with P_trust near 1 leaves an outlier mass of a fraction of a token: the mean must still
    be the FKL (here 2 on every token), not the mass-weighted sum."""
    terms, teacher, sampled, prefix = _tokens([True, True], [-1.0, -1.0], [-1.1, -1.2])  # r slightly below 0
    terms = terms._replace(fkl=torch.full((2,), 2.0))
    out = loss_fn("tropd", trust_mode="expected")(terms, teacher, sampled, prefix, 0, 1)
    assert 0.0 < 2 - 2 * out.metrics["trust_fraction"] < 1.0  # the outlier mass (1 - P_trust summed)
    assert out.metrics["outlier_fkl_mean"] == pytest.approx(2.0)


def test_step_options_default_to_the_first_step_of_a_one_step_schedule():
    objective = loss_fn("tropd", k=8, k_end=2)
    assert objective.step_options().k == 8 and objective.step_options(1, 1).k == 2


def test_step_options_of_a_step_alone_use_a_one_step_schedule():
    """step_options(1) with the default total of 1 steps is the end of the schedule: k_end. Kills
    objectives.xǁObjectiveǁstep_options__mutmut_2 (default total_steps=2: frac 1/2, k = 5)."""
    assert loss_fn("tropd", k=8, k_end=2).step_options(1).k == 2


def test_end_ids_come_from_models_with_or_without_a_generation_config():
    class Tok:
        eos_token_id = 2

    class Gen:
        pass

    class WithConfig:
        generation_config = Gen()

    assert end_token_ids(Tok(), object(), WithConfig()) == (2,)  # no generation_config; one without eos_token_id
    Tok.eos_token_id = None
    with pytest.raises(ValueError) as err:
        end_token_ids(Tok(), object())
    assert str(err.value) == "neither the tokenizer nor the model's generation_config names an end-of-sequence token"


def test_the_backend_refusals_and_choices_word_for_word(monkeypatch):
    monkeypatch.delenv("TROPD_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert tk.resolve_backend("torch", cpu) == "torch"  # torch needs no interpreter
    with pytest.raises(ValueError) as err:
        tk.resolve_backend("gpu", cpu)
    assert str(err.value) == "backend='gpu' (argument or TROPD_KERNELS_BACKEND): expected one of triton, torch"
    with pytest.raises(ValueError) as err:
        tk.resolve_backend("triton", cpu)
    assert str(err.value) == (
        "backend='triton' cannot run on cpu tensors: use CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
        "before triton is imported, or backend='torch'"
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from tropd_kernels.backend import backend_module

    assert backend_module("triton", cpu).__name__ == "tropd_kernels.vocab_pass_triton"  # the one asked for
    assert backend_module("torch", cpu).__name__ == "tropd_kernels.vocab_pass_torch"


def logprob(logits, targets):
    return tk.teacher_topk(logits, targets, 1).target_logprob


def test_the_score_matrix_checks_word_for_word_and_at_one_column():
    targets = torch.zeros(2, dtype=torch.long)
    lp = logprob(torch.zeros(2, 1), targets)  # V = 1 is a vocabulary (of one token)
    assert lp.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=re.escape("logits has shape list: expected a 2-D tensor [N, V]")):
        logprob([[0.0]], targets)
    with pytest.raises(ValueError) as err:
        logprob(torch.zeros(2, 0), targets)
    assert str(err.value) == "logits has V=0 columns: expected V >= 1"
    with pytest.raises(ValueError, match=re.escape("targets has shape list: expected [N] with N=2")):
        logprob(torch.zeros(2, 3), [0, 1])
    assert logprob(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)).item() == pytest.approx(-math.log(3))


def test_the_teacher_checks_find_a_repeated_id_anywhere_in_a_row_and_name_it():
    n, k = 2, 3
    good = tk.TeacherTopK(torch.tensor([[0, 5, 6], [1, 2, 3]]), torch.full((n, k), -2.0), torch.full((n,), -1.0),
                          torch.zeros(n))  # fmt: skip
    logits, targets = torch.zeros(n, 8), torch.zeros(n, dtype=torch.long)
    tk.token_terms(logits, targets, good)
    for ids in ([[0, 5, 5], [1, 2, 3]], [[4, 4, 1], [1, 2, 3]]):  # a repeat after the first entry; k = 2 too
        bad = good._replace(ids=torch.tensor(ids))
        with pytest.raises(ValueError) as err:
            tk.token_terms(logits, targets, bad)
        assert str(err.value) == "teacher.ids repeats an id within a row: expected k distinct ids per row"
    two = tk.TeacherTopK(torch.tensor([[3, 3], [1, 2]]), torch.full((n, 2), -2.0), torch.full((n,), -1.0),
                         torch.zeros(n))  # fmt: skip
    with pytest.raises(ValueError, match="repeats an id within a row"):
        tk.token_terms(logits, targets, two)


def test_kernel_options_hold_the_checked_temperature_and_the_jsd_floor_refusal_word_for_word():
    assert type(tk.KernelOptions(temperature=2).temperature) is float
    with pytest.raises(ValueError) as err:
        tk.KernelOptions(divergence="jsd", logprob_floor=-5.0)
    assert str(err.value).endswith("(the JSD is bounded by log 2 without it); expected logprob_floor=None")


def test_a_temperature_of_exactly_two_scales_the_logits_on_the_torch_backend():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(5, 11, generator=g) * 3, torch.randint(0, 11, (5,), generator=g)
    teacher = tk.teacher_topk(torch.randn(5, 11, generator=g), targets, 4, temperature=2.0, backend="torch")
    got = tk.token_terms(logits, targets, teacher, temperature=2.0, backend="torch")
    want = tk.token_terms_oracle(logits.double(), targets, teacher, temperature=2.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    want_lp = (logits.double() / 2.0).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got.logprob.double(), want_lp, rtol=1e-5, atol=1e-6)


def test_the_target_checks_run_on_a_single_row():
    with pytest.raises(ValueError) as err:
        tk.teacher_topk(torch.zeros(1, 3), torch.tensor([5]), 1)
    assert str(err.value) == "targets contains 5: expected ids in [0, 3) or -100 (ignored)"


def test_the_teachers_from_hidden_pass_defaults_to_t1_takes_k_up_to_v_and_reads_target_id_0():
    """From hidden states [N, d] and a weight [V, d] with d < k <= V, a target of id 0 among the rows: the same
    TeacherTopK as the logits pass at its default temperature 1."""
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(4, 3, generator=g), torch.randn(11, 3, generator=g)
    targets = torch.tensor([0, 5, 0, 10])
    got = tk.teacher_topk_from_hidden(hidden, weight, targets, 6)  # k = 6 > d = 3
    want = tk.teacher_topk(hidden @ weight.T, targets, 6)
    assert torch.equal(got.ids, want.ids)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    row0 = (hidden[0] @ weight.T).log_softmax(-1)[0]
    assert got.target_logprob[0].item() == pytest.approx(row0.item(), rel=1e-5)


def test_an_entry_of_zero_teacher_mass_stays_out_of_the_fkl_under_a_coverage():
    """A hand-built teacher whose second entry has log-prob -inf and a mass before it (0.5) below fkl_cover: the
    entry is not kept, so the FKL is 0.5 (log 0.5 - log 0.25) and the student's kept mass 0.25. Kills
    topk_fkl.x_kept_entries__mutmut_13 (keep &= ... -> keep = ...: q > 0 is lost, the entry is kept, its term is
    0 * -inf = NaN and the kept mass 0.5)."""
    teacher = tk.TeacherTopK(torch.tensor([[0, 1]]), torch.tensor([[math.log(0.5), -math.inf]]), torch.tensor([-1.0]),
                             torch.tensor([0.0]))  # fmt: skip
    terms = tk.token_terms(torch.zeros(1, 4), torch.tensor([0]), teacher, fkl_cover=0.9)
    assert torch.isfinite(terms.fkl).all()
    assert terms.fkl.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert terms.topk_mass.item() == pytest.approx(0.25, rel=1e-6)
