"""The kernel contract: result types and the argument checks every entry point shares."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

IGNORE_INDEX = -100
FKL_MODES = ("paper", "tail", "renorm")
DIVERGENCES = ("fkl", "jsd")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TeacherTopK(NamedTuple):
    """The teacher reduced to what distillation needs, per response token.

    ids are the teacher's k most likely tokens, most likely first; logprobs their log-probabilities
    (not renormalised); target_logprob the log-probability of the sampled token; entropy the
    full-vocabulary entropy. Rows whose target is -100 are all zeros.
    """

    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k] fp32
    target_logprob: torch.Tensor  # [N] fp32
    entropy: torch.Tensor  # [N] fp32


class TokenTerms(NamedTuple):
    """Per-token student terms. logprob and fkl carry gradients; entropy and topk_mass do not."""

    logprob: torch.Tensor  # [N] fp32, lp_S(t) of the sampled token
    fkl: torch.Tensor  # [N] fp32, top-k forward KL (the top-k JSD with KernelOptions(divergence="jsd"))
    entropy: torch.Tensor  # [N] fp32, full-vocabulary student entropy
    topk_mass: torch.Tensor  # [N] fp32, student mass on the teacher's (kept) top-k


def check_temperature(temperature: float) -> float:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
    return float(temperature)


def check_logits_targets(logits: torch.Tensor, targets: torch.Tensor, name: str = "logits") -> None:
    """Shapes, dtypes and target range of a [N, V] score matrix and its [N] targets."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} has shape {shape}: expected a 2-D tensor [N, V]")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype={logits.dtype}: expected one of float32, bfloat16, float16")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} has V={logits.shape[1]} columns: expected V >= 1")
    check_targets(targets, logits.shape[0], logits.shape[1], logits.device)


def check_targets(targets: torch.Tensor, n: int, vocab: int, device: torch.device) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != n:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets has shape {shape}: expected [N] with N={n}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets.dtype={targets.dtype}: expected int64 or int32")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device}: expected the same device as the scores ({device})")
    if n == 0:
        return
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"targets contains {value}: expected ids in [0, {vocab}) or {IGNORE_INDEX} (ignored)")


def check_k(k: int, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > vocab:
        raise ValueError(f"k={k!r}: expected an integer in [1, V={vocab}]")
    return k


def check_teacher(teacher: TeacherTopK, targets: torch.Tensor, vocab: int) -> None:
    n, device = targets.shape[0], targets.device
    if not isinstance(teacher, TeacherTopK):
        raise ValueError(f"teacher is a {type(teacher).__name__}: expected a TeacherTopK")
    ids, logprobs = teacher.ids, teacher.logprobs
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 1:
        raise ValueError(f"teacher.ids has shape {tuple(ids.shape)}: expected [N, k] with N={n}, k >= 1")
    if ids.dtype != torch.int64:
        raise ValueError(f"teacher.ids.dtype={ids.dtype}: expected int64")
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"teacher.logprobs has shape {tuple(logprobs.shape)}: expected {tuple(ids.shape)} like teacher.ids"
        )
    if logprobs.dtype != torch.float32:
        raise ValueError(f"teacher.logprobs.dtype={logprobs.dtype}: expected float32")
    for name in ("target_logprob", "entropy"):
        t = getattr(teacher, name)
        if t.shape != (n,):
            raise ValueError(f"teacher.{name} has shape {tuple(t.shape)}: expected [N] with N={n}")
    for name in ("ids", "logprobs", "target_logprob", "entropy"):
        if getattr(teacher, name).device != device:
            raise ValueError(f"teacher.{name} is on {getattr(teacher, name).device}: expected {device}")
    check_k(ids.shape[1], vocab)
    if n and bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"teacher.ids holds ids outside [0, {vocab}): teacher and student vocabularies differ?")
    if ids.shape[1] > 1 and n:
        s = ids[targets != IGNORE_INDEX].sort(dim=1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):
            raise ValueError("teacher.ids repeats an id within a row: expected k distinct ids per row")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_fkl_options(fkl_mode: str, logprob_floor: float | None, fkl_cover: float | None) -> None:
    if fkl_mode not in FKL_MODES:
        raise ValueError(f"fkl_mode={fkl_mode!r}: expected one of {', '.join(FKL_MODES)}")
    if logprob_floor is not None and not (_is_number(logprob_floor) and logprob_floor <= 0):
        raise ValueError(f"logprob_floor={logprob_floor!r}: expected None or a number <= 0 (e.g. -10)")
    if fkl_cover is not None and not (_is_number(fkl_cover) and 0 < fkl_cover <= 1):
        raise ValueError(f"fkl_cover={fkl_cover!r}: expected None or a number in (0, 1]")


def check_divergence(divergence: str, jsd_beta: float, logprob_floor: float | None) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}: expected one of {', '.join(DIVERGENCES)}")
    if not (_is_number(jsd_beta) and 0 < jsd_beta < 1):
        raise ValueError(f"jsd_beta={jsd_beta!r}: expected a number in (0, 1)")
    if divergence == "jsd" and logprob_floor is not None:
        raise ValueError(
            f"logprob_floor={logprob_floor!r} with divergence='jsd': the floor is for the forward KL only "
            "(the JSD is bounded by log 2 without it); expected logprob_floor=None"
        )


@dataclass(frozen=True)
class KernelOptions:
    """How the student's vocabulary pass turns logits into terms, checked once when made.

    temperature divides the logits before every softmax; fkl_mode, logprob_floor and fkl_cover shape
    the top-k forward KL (docs/METHOD.md). divergence="jsd" puts the generalized Jensen-Shannon
    divergence over the same entries in TokenTerms.fkl instead (the paper's JSD baseline, Table 1):
    jsd_beta KL(teacher || M) + (1 - jsd_beta) KL(student || M), M = jsd_beta teacher + (1 - jsd_beta) student.
    fkl_mode and fkl_cover choose its entries as they do for the FKL; logprob_floor is for the FKL only."""

    temperature: float = 1.0
    fkl_mode: str = "paper"
    logprob_floor: float | None = None
    fkl_cover: float | None = None
    divergence: str = "fkl"
    jsd_beta: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        check_fkl_options(self.fkl_mode, self.logprob_floor, self.fkl_cover)
        check_divergence(self.divergence, self.jsd_beta, self.logprob_floor)
