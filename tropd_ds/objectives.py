"""Objectives of docs/METHOD.md: TrOPD and the baselines it is compared against.

All vocabulary-sized work happened in `tropd_kernels`; everything here is arithmetic over
[N]-shaped tensors. Each objective is a typed options value (`TrOPD`, `OPD`, ...) and one small loss
function over the response tokens of a micro-batch; its metrics are computed apart from the math.
`loss_fn(name, **options)` returns a callable

    objective(terms, teacher, sampled, prefix, step, total_steps, generator=None,
              *, token_count=None, old_logprob=None, selection_count=None, entropy_threshold=None)
        -> LossOutput(loss, metrics)

The loss is a token mean over every response token of the global batch (sampled or prefix). Pass
`token_count` (the global number of response tokens) and the summed loss of all micro-batches and
ranks equals the loss of one big batch. Objectives that select tokens by a batch statistic
(`entropy_opd`, `reopold`) take that statistic from the tensors they see unless the caller passes
the global one (`entropy_threshold`, `selection_count`); `batch_statistics` computes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from tropd_kernels import KernelOptions, TeacherTopK, TokenTerms
from tropd_kernels.contract import check_divergence, check_fkl_options

TRUST_MODES = ("bernoulli", "expected", "threshold")
OUTLIERS = ("fkl", "mask", "clip")
DEFAULT_TAU = math.log(0.2 / 0.8)  # = REOPOLD's c for lambda = 0.2


# ----------------------------------------------------------------------------- options, one type each


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# option -> (test, what is accepted); every options type checks its fields against this table, except the
# kernel's own (fkl_mode, logprob_floor, fkl_cover), which the kernel contract checks
_ACCEPTED: dict[str, tuple[Callable[[object], bool], str]] = {
    "ppo_clip": (lambda v: v is None or (_is_num(v) and 0 < v < 1), "None or a number in (0, 1)"),
    "trust_mode": (lambda v: v in TRUST_MODES, f"one of {', '.join(TRUST_MODES)}"),
    "trust_tau": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "outlier": (lambda v: v in OUTLIERS, f"one of {', '.join(OUTLIERS)}"),
    "tau": (_is_num, "a number (a log-ratio threshold, e.g. -1.386), not NaN"),
    "beta": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "k": (_is_count, "an integer >= 1"),
    "k_end": (lambda v: v is None or _is_count(v), "an integer >= 1"),
    "cover_end": (lambda v: v is None or (_is_num(v) and 0 < v <= 1), "None or a number in (0, 1]"),
    "reopold_lambda": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "reopold_stages": (lambda v: v in (1, 2) and not isinstance(v, bool), "1 or 2"),
    "reopold_switch": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "reopold_entropy_fraction": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "entropy_fraction": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "eopd_entropy_threshold": (lambda v: _is_num(v) and v >= 0, "a number >= 0 (nats)"),
    "jsd_beta": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
}


@dataclass(frozen=True)
class _Options:
    def __post_init__(self):
        for f in fields(self):
            if f.name not in _ACCEPTED:
                continue
            ok, accepted = _ACCEPTED[f.name]
            value = getattr(self, f.name)
            if not ok(value):
                raise ValueError(f"{f.name}={value!r}: expected {accepted}")


@dataclass(frozen=True)
class _PolicyGradient(_Options):
    ppo_clip: float | None = None  # PPO ratio clip for several updates per batch (the trainer makes one)


@dataclass(frozen=True)
class _TopK(_Options):
    """The top-k forward-KL term: k teacher entries per token, and how the kernels form the FKL."""

    k: int = 64
    fkl_mode: str = "paper"
    logprob_floor: float | None = None
    fkl_cover: float | None = None
    k_end: int | None = None  # k moves linearly from k to k_end over the run
    cover_end: float | None = None  # fkl_cover moves linearly to cover_end

    def __post_init__(self):
        super().__post_init__()
        check_fkl_options(self.fkl_mode, self.logprob_floor, self.fkl_cover)
        if self.cover_end is not None and self.fkl_cover is None:
            raise ValueError(
                "cover_end is set but fkl_cover is None: a coverage schedule needs its start value fkl_cover"
            )


@dataclass(frozen=True)
class OPD(_PolicyGradient):
    pass


@dataclass(frozen=True)
class TrOPD(_TopK, _PolicyGradient):
    trust_mode: str = "bernoulli"
    trust_tau: float = 0.5  # threshold of trust_mode=threshold
    outlier: str = "fkl"
    tau: float = DEFAULT_TAU  # reward floor of outlier=clip
    beta: float = 0.001  # weight of the guidance term on teacher-prefix tokens


@dataclass(frozen=True)
class MaskOutlier(_PolicyGradient):
    tau: float = DEFAULT_TAU


@dataclass(frozen=True)
class ClipOutlier(_PolicyGradient):
    tau: float = DEFAULT_TAU


@dataclass(frozen=True)
class REOPOLD(_PolicyGradient):
    reopold_lambda: float = 0.2
    reopold_stages: int = 2
    reopold_switch: float = 0.5
    reopold_entropy_fraction: float = 0.5


@dataclass(frozen=True)
class EntropyOPD(_PolicyGradient):
    entropy_fraction: float = 0.2


@dataclass(frozen=True)
class EOPD(_TopK, _PolicyGradient):
    k: int = 16  # EOPD's own setting
    fkl_mode: str = "renorm"
    eopd_entropy_threshold: float = 0.8


@dataclass(frozen=True)
class FKLTopK(_TopK):
    pass


@dataclass(frozen=True)
class JSD(_TopK):
    """The paper's JSD baseline (Table 1): the generalized JSD over the teacher's top-k, every sampled token."""

    jsd_beta: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_divergence("jsd", self.jsd_beta, self.logprob_floor)


def option_names(options_type) -> list[str]:
    return sorted(f.name for f in fields(options_type))


# ----------------------------------------------------------------------------- what a loss function sees


@dataclass
class Tokens:
    """The response tokens of one micro-batch, as every loss function sees them."""

    terms: TokenTerms
    teacher: TeacherTopK
    sampled: torch.Tensor  # [N] bool: S
    prefix: torch.Tensor  # [N] bool: P (never also in S)
    step: int
    total_steps: int
    generator: torch.Generator | None
    old_logprob: torch.Tensor | None
    selection_count: float | None
    entropy_threshold: float | None

    def __post_init__(self):
        self.lp = self.terms.logprob
        self.r = torch.where(self.sampled, (self.teacher.target_logprob - self.lp).detach(), 0.0)  # r_t on S, else 0
        self.s = self.sampled.float()

    def pg(self, reward: torch.Tensor, ppo_clip: float | None) -> torch.Tensor:
        """PG(R) = -sg(R) lp_S(t), or the clipped PPO ratio form with old log-probs."""
        if ppo_clip is None:
            return -reward * self.lp
        ratio = torch.exp(self.lp - self.old_logprob.detach())
        clipped = ratio.clamp(1 - ppo_clip, 1 + ppo_clip)
        return -torch.minimum(ratio * reward, clipped * reward)


@dataclass
class Loss:
    per_token: torch.Tensor  # [N], summed and divided by the token count
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named per-token pieces, for the metrics
    count: float | None = None  # a denominator of the objective's own (REOPOLD: sum M)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar; already divided by the (global) token count
    metrics: dict[str, float] = field(default_factory=dict)
    trust: torch.Tensor | None = None  # [N] TrOPD's trust mask, as the loss drew it (per-teacher metrics read it)


# ----------------------------------------------------------------------------- the objectives


def opd_loss(o: OPD, x: Tokens) -> Loss:
    return Loss(x.pg(x.r, o.ppo_clip) * x.s)


def tropd_loss(o: TrOPD, x: Tokens) -> Loss:
    p_trust = torch.exp(x.r.clamp(max=0.0))  # min(exp(r), 1)
    if o.trust_mode == "bernoulli":
        gen_device = x.generator.device if x.generator is not None else p_trust.device
        u = torch.rand(p_trust.shape, generator=x.generator, device=gen_device).to(p_trust.device)
        m = (u < p_trust).float()
    elif o.trust_mode == "expected":
        m = p_trust
    else:
        m = (p_trust >= o.trust_tau).float()
    m = torch.where(x.sampled, m, 0.0)
    if o.outlier == "fkl":
        out = x.terms.fkl
    elif o.outlier == "clip":
        out = x.pg(torch.clamp(x.r, min=o.tau), o.ppo_clip)
    else:
        out = torch.zeros_like(x.lp)
    trusted = m * x.pg(x.r, o.ppo_clip) * x.s
    outlier = (1 - m) * out * x.s
    guidance = o.beta * (-x.lp) * x.prefix.float()
    return Loss(
        trusted + outlier + guidance, {"trust": m, "trusted": trusted, "outlier": outlier, "guidance": guidance}
    )


def mask_outlier_loss(o: MaskOutlier, x: Tokens) -> Loss:
    keep = (x.r > o.tau).float() * x.s
    return Loss(keep * x.pg(x.r, o.ppo_clip), {"keep": keep})


def clip_outlier_loss(o: ClipOutlier, x: Tokens) -> Loss:
    return Loss(x.pg(torch.clamp(x.r, min=o.tau), o.ppo_clip) * x.s, {"clipped": (x.r < o.tau) & x.sampled})


def reopold_floor(o: REOPOLD) -> float:
    return math.log(o.reopold_lambda / (1 - o.reopold_lambda))  # c


def reopold_selection(o: REOPOLD, entropy, r, sampled, step, total_steps, entropy_threshold):
    """M_t: every sampled token (one stage); stage 1 r_t >= c; stage 2 the top entropy fraction."""
    if o.reopold_stages == 1:
        return sampled.float(), None
    if step < o.reopold_switch * total_steps:
        return (sampled & (r >= reopold_floor(o))).float(), None
    if entropy_threshold is None:
        entropy_threshold = top_fraction_threshold(entropy[sampled], o.reopold_entropy_fraction)
    return (sampled & (entropy >= entropy_threshold)).float(), entropy_threshold


def reopold_loss(o: REOPOLD, x: Tokens) -> Loss:
    c = reopold_floor(o)
    m, _ = reopold_selection(o, x.terms.entropy, x.r, x.sampled, x.step, x.total_steps, x.entropy_threshold)
    count = float(x.selection_count) if x.selection_count is not None else float(m.sum())
    return Loss(m * x.pg(torch.clamp(x.r, min=c), o.ppo_clip), {"selected": m, "clipped": (x.r < c) & x.sampled}, count)


def entropy_opd_loss(o: EntropyOPD, x: Tokens) -> Loss:
    threshold = x.entropy_threshold
    if threshold is None:
        threshold = top_fraction_threshold(x.terms.entropy[x.sampled], o.entropy_fraction)
    keep = (x.terms.entropy >= threshold).float() * x.s
    return Loss(keep * x.pg(x.r, o.ppo_clip), {"selected": keep})


def eopd_loss(o: EOPD, x: Tokens) -> Loss:
    gate = (x.teacher.entropy > o.eopd_entropy_threshold).float() * x.s
    return Loss(x.pg(x.r, o.ppo_clip) * x.s + gate * x.terms.fkl, {"fkl": gate})


def fkl_topk_loss(o: FKLTopK, x: Tokens) -> Loss:  # noqa: ARG001  (no option changes the math)
    return Loss(x.terms.fkl * x.s)


def jsd_loss(o: JSD, x: Tokens) -> Loss:  # noqa: ARG001  (jsd_beta reaches the kernels through step_options)
    return Loss(x.terms.fkl * x.s)  # with JSD options the kernels' top-k term is the JSD


def top_fraction_threshold(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest value among the top `fraction` of `values` (at least one is kept)."""
    if values.numel() == 0:
        return torch.tensor(float("inf"), device=values.device)
    keep = max(1, math.ceil(fraction * values.numel()))
    return values.float().topk(keep).values[-1]


# ----------------------------------------------------------------------------- metrics, apart from the math


def _fraction(mask: torch.Tensor, x: Tokens) -> float:
    return float(mask.sum()) / max(float(x.s.sum()), 1.0)


def tropd_metrics(loss: Loss, x: Tokens, denom: float) -> dict[str, float]:
    m, p = loss.parts["trust"], loss.parts
    n_s = max(float(x.s.sum()), 1.0)
    return dict(
        trust_fraction=float(m.sum()) / n_s,
        loss_trusted=float(p["trusted"].detach().sum()) / denom,
        loss_outlier=float(p["outlier"].detach().sum()) / denom,
        loss_guidance=float(p["guidance"].detach().sum()) / denom,
        outlier_fkl_mean=float(((1 - m) * x.terms.fkl.detach() * x.s).sum()) / max(float(((1 - m) * x.s).sum()), 1e-12),
    )


def common_metrics(x: Tokens, loss: torch.Tensor) -> dict[str, float]:
    """The per-step metrics (docs/METHOD.md): the log-ratio's mean and low quantiles, FKL, top-k mass, entropies."""
    out = {
        "loss": float(loss.detach()),
        "sampled_tokens": float(x.sampled.sum()),
        "prefix_tokens": float(x.prefix.sum()),
    }
    if bool(x.sampled.any()):
        rs = x.r[x.sampled].float()
        q = torch.quantile(rs, torch.tensor([0.01, 0.10], device=rs.device)) if rs.numel() > 1 else rs.repeat(2)
        out.update(
            log_ratio_mean=float(rs.mean()),
            log_ratio_p1=float(q[0]),
            log_ratio_p10=float(q[1]),
            fkl_mean=float(x.terms.fkl.detach()[x.sampled].mean()),
            topk_mass_mean=float(x.terms.topk_mass[x.sampled].mean()),
            student_entropy_mean=float(x.terms.entropy[x.sampled].mean()),
            teacher_entropy_mean=float(x.teacher.entropy[x.sampled].mean()),
        )
    return out


@dataclass(frozen=True)
class Spec:
    options: type
    loss: Callable[[object, Tokens], Loss]
    metrics: Callable[[Loss, Tokens, float], dict[str, float]] = lambda loss, x, denom: {}


SPECS: dict[str, Spec] = {
    "opd": Spec(OPD, opd_loss),
    "tropd": Spec(TrOPD, tropd_loss, tropd_metrics),
    "mask_outlier": Spec(
        MaskOutlier, mask_outlier_loss, lambda loss, x, d: {"fraction_masked": 1 - _fraction(loss.parts["keep"], x)}
    ),
    "clip_outlier": Spec(
        ClipOutlier, clip_outlier_loss, lambda loss, x, d: {"fraction_clipped": _fraction(loss.parts["clipped"], x)}
    ),
    "reopold": Spec(
        REOPOLD,
        reopold_loss,
        lambda loss, x, d: {
            "fraction_selected": _fraction(loss.parts["selected"], x),
            "fraction_clipped": _fraction(loss.parts["clipped"], x),
        },
    ),
    "entropy_opd": Spec(
        EntropyOPD, entropy_opd_loss, lambda loss, x, d: {"fraction_selected": _fraction(loss.parts["selected"], x)}
    ),
    "eopd": Spec(EOPD, eopd_loss, lambda loss, x, d: {"fraction_fkl": _fraction(loss.parts["fkl"], x)}),
    "fkl_topk": Spec(FKLTopK, fkl_topk_loss),
    "jsd": Spec(JSD, jsd_loss),
}
OBJECTIVES = tuple(SPECS)
# Objectives with a top-k forward-KL term. The others need only the teacher's log-prob of the
# sampled token, so the teacher pass keeps k = 1 for them whatever `k` says.
TOPK_OBJECTIVES = tuple(name for name, spec in SPECS.items() if issubclass(spec.options, _TopK))


# ----------------------------------------------------------------------------- the callable


@dataclass(frozen=True)
class StepOptions:
    """What one step asks of the vocabulary kernels: the teacher's k, and the student's KernelOptions."""

    k: int
    kernel: KernelOptions


class Objective:
    def __init__(self, name: str, options: _Options):
        self.name = name
        self.options = options
        self.spec = SPECS[name]

    def step_options(self, step: int = 0, total_steps: int = 1, temperature: float = 1.0) -> StepOptions:
        """k and the kernel options at `step` (linear k and coverage schedules); k = 1 without a top-k term."""
        o = self.options
        if not isinstance(o, _TopK):
            return StepOptions(1, KernelOptions(temperature))
        frac = min(max(step, 0), total_steps) / max(total_steps, 1)
        k = o.k if o.k_end is None else round(o.k + (o.k_end - o.k) * frac)
        cover = o.fkl_cover
        if cover is not None and o.cover_end is not None:
            cover = cover + (o.cover_end - cover) * frac
        if isinstance(o, JSD):
            return StepOptions(k, KernelOptions(temperature, o.fkl_mode, None, cover, "jsd", o.jsd_beta))
        return StepOptions(k, KernelOptions(temperature, o.fkl_mode, o.logprob_floor, cover))

    def max_k(self) -> int:
        """The largest k any step asks of the teacher pass (checked against the vocabulary)."""
        o = self.options
        return max(o.k, o.k_end or 0) if isinstance(o, _TopK) else 1

    def batch_statistics(self, entropy, log_ratio, sampled, step: int, total_steps: int) -> dict:
        """Global selection statistics from the whole batch (gather entropy and r across ranks first)."""
        stats = {}
        if self.name == "entropy_opd":
            stats["entropy_threshold"] = float(top_fraction_threshold(entropy[sampled], self.options.entropy_fraction))
        if self.name == "reopold":
            mask, threshold = reopold_selection(self.options, entropy, log_ratio, sampled, step, total_steps, None)
            stats["selection_count"] = float(mask.sum())
            if threshold is not None:
                stats["entropy_threshold"] = float(threshold)
        return stats

    def __call__(
        self,
        terms: TokenTerms,
        teacher: TeacherTopK,
        sampled: torch.Tensor,
        prefix: torch.Tensor,
        step: int,
        total_steps: int,
        generator: torch.Generator | None = None,
        *,
        token_count: float | None = None,
        old_logprob: torch.Tensor | None = None,
        selection_count: float | None = None,
        entropy_threshold: float | None = None,
    ) -> LossOutput:
        if getattr(self.options, "ppo_clip", None) is not None and old_logprob is None:
            raise ValueError("ppo_clip is set but old_logprob is None: pass the rollout-time student log-probs")
        sampled = sampled.bool()
        x = Tokens(
            terms,
            teacher,
            sampled,
            prefix.bool() & ~sampled,
            step,
            total_steps,
            generator,
            old_logprob,
            selection_count,
            entropy_threshold,
        )
        count = float(token_count) if token_count is not None else float((x.sampled | x.prefix).sum())
        out = self.spec.loss(self.options, x)
        denom = max(count, 1.0)
        loss = out.per_token.sum() / max(out.count, 1.0) if out.count is not None else out.per_token.sum() / denom
        metrics = self.spec.metrics(out, x, denom)
        metrics.update(common_metrics(x, loss))
        return LossOutput(loss=loss, metrics=metrics, trust=out.parts.get("trust"))


def loss_fn(name: str, **options) -> Objective:
    """The objective called `name` with the paper's defaults, overridden by `options`."""
    if name not in SPECS:
        raise ValueError(f"objective name={name!r}: expected one of {', '.join(OBJECTIVES)}")
    accepted = option_names(SPECS[name].options)
    known = {key for spec in SPECS.values() for key in option_names(spec.options)}
    unknown, foreign = sorted(set(options) - known), sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for objective {name!r}: accepted options are {', '.join(accepted)}"
        )
    if foreign:
        raise ValueError(
            f"option {foreign[0]!r} does not apply to objective {name!r}: accepted options are {', '.join(accepted)}"
        )
    return Objective(name, SPECS[name].options(**options))
