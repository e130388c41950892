"""The rollout's KV cache, written in place into buffers sized once for the whole generation.

transformers' `DynamicCache` grows every layer's keys and values by `torch.cat` at every decoded token: the
whole cache is read and written again besides attention's own read of it, three passes over the cache per
token where one would do, and the allocator sees a new tensor of every size on the way (an 8B model with 16
rows at an average position of 5k moves about 21 GB more per token). `preallocated_cache` gives each
full-attention layer a buffer for the prompt width plus the largest budget, allocated at the prefill; each
token writes one column and attention reads a view of the filled part, so the tensors attention sees hold
the same values as DynamicCache's. The peak is the same: the planner already counts the cache at the end of
generation.

Layers of any other kind (sliding-window layers of Mistral-style or Gemma-2-style configs, chunked or linear
attention) keep transformers' own layer: the cache falls back to `DynamicCache` as a whole.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers of `capacity` positions: `update` copies the new
    states in and returns views of the positions filled so far. Past the capacity (not reached by the decode
    loop, which knows its longest budget) it grows the buffers to twice the need, as a safety net."""

    def __init__(self, capacity: int):
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r}: expected a number of positions >= 1")
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.key_buffer = key_states.new_empty(*key_states.shape[:-2], self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:-2], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _grow(self, need: int) -> None:
        size = max(need, 2 * self.capacity)
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:-2], size, old.shape[-1])
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)
        self.capacity = size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.key_buffer = self.value_buffer = None
        super().reset()


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """A cache for `capacity` positions (prompt width + the longest budget) for the model of `config`: every
    layer a PreallocatedLayer when transformers would give every layer a plain DynamicLayer, else
    transformers' own DynamicCache unchanged (`uses_preallocated` tells which)."""
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def uses_preallocated(cache) -> bool:
    return bool(getattr(cache, "layers", None)) and all(isinstance(x, PreallocatedLayer) for x in cache.layers)
