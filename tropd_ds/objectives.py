"""Objectives of ALGORITHM.md section 2: TrOPD and the baselines it is compared against.

All vocabulary-sized work happened in `tropd_kernels`; everything here is arithmetic over
[N]-shaped tensors. `loss_fn(name, **options)` returns a callable

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
from dataclasses import dataclass, field

import torch
from tropd_kernels import TeacherTopK, TokenTerms

OBJECTIVES = ("opd", "tropd", "mask_outlier", "clip_outlier", "reopold", "entropy_opd", "eopd", "fkl_topk")
TRUST_MODES = ("bernoulli", "expected", "threshold")
OUTLIERS = ("fkl", "mask", "clip")
FKL_MODES = ("paper", "tail", "renorm")

DEFAULT_TAU = math.log(0.2 / 0.8)  # = REOPOLD's c for lambda = 0.2

# Every option, its default, and the objectives it applies to.
_KERNEL = {"k", "fkl_mode", "logprob_floor", "fkl_cover", "k_end", "cover_end"}
DEFAULTS: dict[str, object] = {
    "ppo_clip": None,
    "trust_mode": "bernoulli",
    "trust_tau": 0.5,
    "outlier": "fkl",
    "tau": DEFAULT_TAU,
    "beta": 0.001,
    "k": 64,
    "fkl_mode": "paper",
    "logprob_floor": None,
    "fkl_cover": None,
    "k_end": None,
    "cover_end": None,
    "reopold_lambda": 0.2,
    "reopold_stages": 2,
    "reopold_switch": 0.5,
    "reopold_entropy_fraction": 0.5,
    "entropy_fraction": 0.2,
    "eopd_entropy_threshold": 0.8,
}
APPLIES: dict[str, set[str]] = {
    "opd": {"ppo_clip"},
    "tropd": {"ppo_clip", "trust_mode", "trust_tau", "outlier", "tau", "beta"} | _KERNEL,
    "mask_outlier": {"ppo_clip", "tau"},
    "clip_outlier": {"ppo_clip", "tau"},
    "reopold": {"ppo_clip", "reopold_lambda", "reopold_stages", "reopold_switch", "reopold_entropy_fraction"},
    "entropy_opd": {"ppo_clip", "entropy_fraction"},
    "eopd": {"ppo_clip", "eopd_entropy_threshold"} | _KERNEL,
    "fkl_topk": set(_KERNEL),
}
OVERRIDES = {"eopd": {"k": 16, "fkl_mode": "renorm"}}  # EOPD's own setting
# Objectives with a top-k forward-KL term. The others need only the teacher's log-prob of the
# sampled token, so the teacher pass keeps k = 1 for them whatever `k` says.
TOPK_OBJECTIVES = ("tropd", "eopd", "fkl_topk")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar; already divided by the (global) token count
    metrics: dict[str, float] = field(default_factory=dict)


def max_prefix_len(step: int, total_steps: int, l_max: int) -> int:
    """Cosine schedule of the longest teacher prefix: l_max at step 0, 0 at the last step."""
    if total_steps < 1 or step < 0 or l_max < 0:
        raise ValueError(f"step={step}, total_steps={total_steps}, l_max={l_max}: expected 0 <= step, 1 <= total_steps, 0 <= l_max")
    frac = min(step, total_steps) / total_steps
    return int(math.floor(l_max * (1 + math.cos(math.pi * frac)) / 2))


def draw_prefix_len(step: int, total_steps: int, l_max: int, response_len: int, generator: torch.Generator) -> int:
    """l ~ Uniform{0 .. min(l_max(step), |y_T|)}, drawn with the caller's seeded generator."""
    high = min(max_prefix_len(step, total_steps, l_max), max(0, response_len))
    return int(torch.randint(0, high + 1, (1,), generator=generator))


def _check(name: str, value, ok: bool, accepted: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {accepted}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _validate(opts: dict) -> None:
    _check("ppo_clip", opts["ppo_clip"], opts["ppo_clip"] is None or (_is_num(opts["ppo_clip"]) and 0 < opts["ppo_clip"] < 1), "None or a number in (0, 1)")
    _check("trust_mode", opts["trust_mode"], opts["trust_mode"] in TRUST_MODES, f"one of {', '.join(TRUST_MODES)}")
    _check("trust_tau", opts["trust_tau"], _is_num(opts["trust_tau"]) and 0 < opts["trust_tau"] <= 1, "a number in (0, 1]")
    _check("outlier", opts["outlier"], opts["outlier"] in OUTLIERS, f"one of {', '.join(OUTLIERS)}")
    _check("tau", opts["tau"], _is_num(opts["tau"]), "a number (a log-ratio threshold, e.g. -1.386), not NaN")
    _check("beta", opts["beta"], _is_num(opts["beta"]) and opts["beta"] >= 0, "a number >= 0")
    for key in ("k", "k_end"):
        v = opts[key]
        _check(key, v, (v is None and key == "k_end") or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), "an integer >= 1")
    _check("fkl_mode", opts["fkl_mode"], opts["fkl_mode"] in FKL_MODES, f"one of {', '.join(FKL_MODES)}")
    floor = opts["logprob_floor"]
    _check("logprob_floor", floor, floor is None or (_is_num(floor) and floor <= 0), "None or a number <= 0")
    for key in ("fkl_cover", "cover_end"):
        v = opts[key]
        _check(key, v, v is None or (_is_num(v) and 0 < v <= 1), "None or a number in (0, 1]")
    if opts["cover_end"] is not None and opts["fkl_cover"] is None:
        raise ValueError("cover_end is set but fkl_cover is None: a coverage schedule needs its start value fkl_cover")
    lam = opts["reopold_lambda"]
    _check("reopold_lambda", lam, _is_num(lam) and 0 < lam < 1, "a number in (0, 1)")
    _check("reopold_stages", opts["reopold_stages"], opts["reopold_stages"] in (1, 2), "1 or 2")
    sw = opts["reopold_switch"]
    _check("reopold_switch", sw, _is_num(sw) and 0 <= sw <= 1, "a number in [0, 1]")
    for key in ("reopold_entropy_fraction", "entropy_fraction"):
        _check(key, opts[key], _is_num(opts[key]) and 0 < opts[key] <= 1, "a number in (0, 1]")
    th = opts["eopd_entropy_threshold"]
    _check("eopd_entropy_threshold", th, _is_num(th) and th >= 0, "a number >= 0 (nats)")


def top_fraction_threshold(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest value among the top `fraction` of `values` (at least one is kept)."""
    if values.numel() == 0:
        return torch.tensor(float("inf"), device=values.device)
    keep = max(1, math.ceil(fraction * values.numel()))
    return values.float().topk(keep).values[-1]


class Objective:
    def __init__(self, name: str, options: dict):
        self.name = name
        self.options = options
        for key, value in options.items():
            setattr(self, key, value)

    def kernel_options(self, step: int = 0, total_steps: int = 1) -> dict:
        """k, fkl_mode, logprob_floor and fkl_cover for the kernels at `step` (linear k / cover schedules)."""
        frac = min(max(step, 0), total_steps) / max(total_steps, 1)
        k = self.k if self.k_end is None else round(self.k + (self.k_end - self.k) * frac)
        if self.name not in TOPK_OBJECTIVES:
            k = 1
        cover = self.fkl_cover
        if cover is not None and self.cover_end is not None:
            cover = cover + (self.cover_end - cover) * frac
        return dict(k=k, fkl_mode=self.fkl_mode, logprob_floor=self.logprob_floor, fkl_cover=cover)

    def max_k(self) -> int:
        """The largest k any step asks of the teacher pass (checked against the vocabulary)."""
        if self.name not in TOPK_OBJECTIVES:
            return 1
        return max(self.k, self.k_end or 0)

    def batch_statistics(self, entropy: torch.Tensor, log_ratio: torch.Tensor, sampled: torch.Tensor, step: int, total_steps: int) -> dict:
        """Global selection statistics from the whole batch (gather entropy and r across ranks first)."""
        stats = {}
        if self.name == "entropy_opd":
            stats["entropy_threshold"] = float(top_fraction_threshold(entropy[sampled], self.entropy_fraction))
        if self.name == "reopold":
            mask, threshold = self._reopold_mask(entropy, log_ratio, sampled, step, total_steps, None)
            stats["selection_count"] = float(mask.sum())
            if threshold is not None:
                stats["entropy_threshold"] = float(threshold)
        return stats

    def _reopold_mask(self, entropy, r, sampled, step, total_steps, entropy_threshold):
        if self.reopold_stages == 1:
            return sampled.float(), None
        c = math.log(self.reopold_lambda / (1 - self.reopold_lambda))
        if step < self.reopold_switch * total_steps:
            return (sampled & (r >= c)).float(), None
        if entropy_threshold is None:
            entropy_threshold = top_fraction_threshold(entropy[sampled], self.reopold_entropy_fraction)
        return (sampled & (entropy >= entropy_threshold)).float(), entropy_threshold

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
        sampled, prefix = sampled.bool(), prefix.bool() & ~sampled.bool()
        lp = terms.logprob
        r = (teacher.target_logprob - lp).detach()
        r = torch.where(sampled, r, 0.0)
        s = sampled.float()
        count = float(token_count) if token_count is not None else float((sampled | prefix).sum())
        denom = max(count, 1.0)

        if self.ppo_clip is not None and old_logprob is None:
            raise ValueError("ppo_clip is set but old_logprob is None: pass the rollout-time student log-probs")

        def pg(reward: torch.Tensor) -> torch.Tensor:
            if self.ppo_clip is None:
                return -reward * lp
            ratio = torch.exp(lp - old_logprob.detach())
            clipped = ratio.clamp(1 - self.ppo_clip, 1 + self.ppo_clip)
            return -torch.minimum(ratio * reward, clipped * reward)

        metrics: dict[str, float] = {}
        per_token = torch.zeros_like(lp)
        name = self.name
        if name == "opd":
            per_token = pg(r) * s
        elif name == "tropd":
            p_trust = torch.exp(r.clamp(max=0.0))
            if self.trust_mode == "bernoulli":
                gen_device = generator.device if generator is not None else p_trust.device
                u = torch.rand(p_trust.shape, generator=generator, device=gen_device).to(p_trust.device)
                m = (u < p_trust).float()
            elif self.trust_mode == "expected":
                m = p_trust
            else:
                m = (p_trust >= self.trust_tau).float()
            m = torch.where(sampled, m, 0.0)
            if self.outlier == "fkl":
                out = terms.fkl
            elif self.outlier == "clip":
                out = pg(torch.clamp(r, min=self.tau))
            else:
                out = torch.zeros_like(lp)
            trusted = m * pg(r) * s
            outlier = (1 - m) * out * s
            guidance = self.beta * (-lp) * prefix.float()
            per_token = trusted + outlier + guidance
            n_s = max(float(s.sum()), 1.0)
            metrics.update(
                trust_fraction=float(m.sum()) / n_s,
                loss_trusted=float(trusted.detach().sum()) / denom,
                loss_outlier=float(outlier.detach().sum()) / denom,
                loss_guidance=float(guidance.detach().sum()) / denom,
                outlier_fkl_mean=float(((1 - m) * terms.fkl.detach() * s).sum()) / max(float(((1 - m) * s).sum()), 1e-12),
            )
        elif name == "mask_outlier":
            keep = (r > self.tau).float() * s
            per_token = keep * pg(r)
            metrics["fraction_masked"] = 1 - float(keep.sum()) / max(float(s.sum()), 1.0)
        elif name == "clip_outlier":
            per_token = pg(torch.clamp(r, min=self.tau)) * s
            metrics["fraction_clipped"] = float(((r < self.tau) & sampled).sum()) / max(float(s.sum()), 1.0)
        elif name == "reopold":
            c = math.log(self.reopold_lambda / (1 - self.reopold_lambda))
            m, _ = self._reopold_mask(terms.entropy, r, sampled, step, total_steps, entropy_threshold)
            per_token = m * pg(torch.clamp(r, min=c))
            denom = max(float(selection_count) if selection_count is not None else float(m.sum()), 1.0)
            metrics["fraction_selected"] = float(m.sum()) / max(float(s.sum()), 1.0)
            metrics["fraction_clipped"] = float(((r < c) & sampled).sum()) / max(float(s.sum()), 1.0)
        elif name == "entropy_opd":
            threshold = entropy_threshold
            if threshold is None:
                threshold = top_fraction_threshold(terms.entropy[sampled], self.entropy_fraction)
            keep = (terms.entropy >= threshold).float() * s
            per_token = keep * pg(r)
            metrics["fraction_selected"] = float(keep.sum()) / max(float(s.sum()), 1.0)
        elif name == "eopd":
            gate = (teacher.entropy > self.eopd_entropy_threshold).float() * s
            per_token = pg(r) * s + gate * terms.fkl
            metrics["fraction_fkl"] = float(gate.sum()) / max(float(s.sum()), 1.0)
        elif name == "fkl_topk":
            per_token = terms.fkl * s

        loss = per_token.sum() / denom
        metrics.update(self._common_metrics(terms, teacher, r, sampled, prefix, loss))
        return LossOutput(loss=loss, metrics=metrics)

    @staticmethod
    def _common_metrics(terms, teacher, r, sampled, prefix, loss) -> dict[str, float]:
        out = {"loss": float(loss.detach()), "sampled_tokens": float(sampled.sum()), "prefix_tokens": float(prefix.sum())}
        if bool(sampled.any()):
            rs = r[sampled].float()
            q = torch.quantile(rs, torch.tensor([0.01, 0.10], device=rs.device)) if rs.numel() > 1 else rs.repeat(2)
            out.update(
                log_ratio_mean=float(rs.mean()),
                log_ratio_p1=float(q[0]),
                log_ratio_p10=float(q[1]),
                fkl_mean=float(terms.fkl.detach()[sampled].mean()),
                topk_mass_mean=float(terms.topk_mass[sampled].mean()),
                student_entropy_mean=float(terms.entropy[sampled].mean()),
                teacher_entropy_mean=float(teacher.entropy[sampled].mean()),
            )
        return out


def loss_fn(name: str, **options) -> Objective:
    """The objective called `name` with the paper's defaults, overridden by `options`."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective name={name!r}: expected one of {', '.join(OBJECTIVES)}")
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for objective {name!r}: accepted options are {', '.join(sorted(APPLIES[name]))}")
    foreign = sorted(set(options) - APPLIES[name])
    if foreign:
        raise ValueError(f"option {foreign[0]!r} does not apply to objective {name!r}: accepted options are {', '.join(sorted(APPLIES[name]))}")
    opts = {**DEFAULTS, **OVERRIDES.get(name, {}), **options}
    _validate(opts)
    return Objective(name, opts)
