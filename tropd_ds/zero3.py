"""ZeRO-3 engine helpers: the parameter-offload object that owns a ZeRO-3 engine's per-module hooks, and a
block with every parameter gathered once and those hooks taken out (the rollout's gathered generation, the
teacher's gathered scoring), restored exactly afterwards."""

from __future__ import annotations

import contextlib


def zero3_offload(engine):
    """The ZeRO-3 parameter-offload object that owns the per-module hooks, or None (no ZeRO-3)."""
    if not hasattr(engine, "zero_optimization_stage") or engine.zero_optimization_stage() != 3:
        return None
    optimizer = getattr(engine, "optimizer", None)  # a ZeRO-3 optimiser, or DeepSpeedZeRoOffload for a frozen engine
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if not hasattr(offload, "forward_hooks") or not hasattr(offload, "_register_deepspeed_module"):
        raise RuntimeError(
            "ZeRO-3 engine without the parameter-offload hooks this DeepSpeed version is expected to have "
            f"({type(optimizer).__name__})"
        )
    return offload


@contextlib.contextmanager
def hook_free_gathered(engine):
    """Every parameter gathered once, ZeRO-3's per-module hooks taken out for the block, then put back
    exactly: the same hook functions under the same ids in the same order, so the engine's next
    forward and backward are those of an engine whose hooks were never touched (nothing is registered
    anew, and ZeRO-3's trace of the module order stays valid).

    Without this, each decoded token runs every module's pre/post-forward hook (bookkeeping and
    collectives' checks) although the parameters are already there: 5x plain `generate` on small models."""
    import deepspeed

    offload = zero3_offload(engine)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        with _hooks_suspended(offload.forward_hooks + offload.backward_hooks):
            yield


@contextlib.contextmanager
def _hooks_suspended(handles):
    """Take the hooks of these `torch.utils.hooks.RemovableHandle`s out of their modules' hook dicts and
    restore every touched dict to its exact former contents (order included) afterwards."""
    touched: dict[int, tuple[dict, list]] = {}
    for handle in handles:
        refs = [handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ())]
        for ref in refs:
            hooks = ref()
            if hooks is not None and handle.id in hooks:
                touched.setdefault(id(hooks), (hooks, list(hooks.items())))
    for handle in handles:
        for hooks, _ in touched.values():
            hooks.pop(handle.id, None)
    try:
        yield
    finally:
        for hooks, items in touched.values():
            hooks.clear()
            hooks.update(items)
