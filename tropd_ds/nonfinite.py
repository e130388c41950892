"""Where a non-finite gradient starts: a diagnosis, off unless TROPD_DS_TRACE_NONFINITE=1.

With it, each student update (its forwards and backwards, nothing else: generation and teacher scoring run
as usual) runs under autograd's anomaly mode, and every submodule of the student carries hooks:
- a NaN made by a backward op raises at once, naming the op and the forward line that made it: the run
  stops there (with several ranks, the others wait in their next collective until its time-out);
- an inf (which anomaly mode lets through) is printed at the first module whose output's gradient holds
  it, once per backward, and after that backward the parameters whose full gradient is non-finite are
  named (a collective under ZeRO-3: every rank runs it);
- a non-finite forward output is printed with its module.
A host sync per module per micro-batch: slow, for diagnosing a run that skips steps for non-finite
gradients, not for training."""

from __future__ import annotations

import contextlib
import os

import torch

ENV = "TROPD_DS_TRACE_NONFINITE"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _summary(t: torch.Tensor) -> str:
    t = t.detach()
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    finite = t[torch.isfinite(t)]
    big = float(finite.abs().max()) if finite.numel() else float("nan")
    return f"shape {tuple(t.shape)} {t.dtype}: {nan} NaN, {inf} inf, max |finite| {big:.3g}"


class Tracer:
    def __init__(self, module: torch.nn.Module, rank: int):
        self.rank = rank
        self.first: str | None = None
        self.step = 0
        self.active = False  # the hooks look only while `watching`
        for name, sub in module.named_modules():
            sub.register_forward_hook(self._forward_hook(name or "<top>"))

    @contextlib.contextmanager
    def watching(self, step: int):
        """Step `step`'s update: the hooks on, autograd's anomaly mode on."""
        self.step, self.active = step, True
        try:
            with torch.autograd.detect_anomaly():
                yield self
        finally:
            self.active = False

    def _say(self, text: str) -> None:
        print(f"[tropd-ds nonfinite] rank {self.rank} step {self.step}: {text}", flush=True)

    def _forward_hook(self, name: str):
        def hook(_module, _inputs, output):
            if not self.active:
                return
            for i, t in enumerate(_tensors(output)):
                if not t.is_floating_point():
                    continue
                if not torch.isfinite(t).all():
                    self._say(f"forward output {i} of {name} is non-finite ({_summary(t)})")
                if t.requires_grad:
                    t.register_hook(self._grad_hook(name, i))

        return hook

    def _grad_hook(self, name: str, index: int):
        def hook(grad):
            if self.first is None and not torch.isfinite(grad).all():
                self.first = f"{name} output {index}"
                self._say(f"first non-finite gradient reaches {self.first} ({_summary(grad)})")

        return hook

    def after_backward(self, engine) -> None:
        from deepspeed.utils import safe_get_full_grad

        bad = []
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:
                continue
            grad = safe_get_full_grad(param)
            if grad is not None and not torch.isfinite(grad).all():
                bad.append(f"{name} ({_summary(grad)})")
        if bad or self.first:
            self._say(f"{len(bad)} parameters with a non-finite gradient: " + "; ".join(bad[:20]))
        self.first = None


def tracer(engine, rank: int) -> Tracer | None:
    """A Tracer on the engine's module when TROPD_DS_TRACE_NONFINITE is set (once per engine)."""
    if not enabled():
        return None
    if getattr(engine, "_nonfinite_tracer", None) is None:
        engine._nonfinite_tracer = Tracer(engine.module, rank)
    return engine._nonfinite_tracer
