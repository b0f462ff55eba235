"""A KV cache with preallocated buffers seeded with a shared prefix (the transformers engine of SmolLM2).

``DynamicCache`` grows by ``torch.cat`` at every step, which copies the whole cache (prefix
included) for every generated token: with a few-hundred-token few-shot prefix that copy was
most of the decode time. Here each layer writes new keys/values into a preallocated buffer and
returns views, so a decode step costs only the attention itself.

Imports torch and transformers: import it where generation runs, not at the anchors' import.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers of ``cap`` positions, written in place; returns views."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, B: int, cap: int, shape=None):
        super().__init__()
        self._cap, self._B, self._n = cap, B, 0
        self._kbuf: Any = None
        self._vbuf: Any = None
        if keys is not None:
            self._alloc(keys)
            assert self._kbuf is not None and self._vbuf is not None
            n = keys.shape[-2]
            self._kbuf[:, :, :n] = keys
            self._vbuf[:, :, :n] = values
            self._n = n
            self._views()

    def _alloc(self, like: torch.Tensor) -> None:
        _, H, _, D = like.shape
        self.dtype, self.device = like.dtype, like.device
        self._kbuf = like.new_empty((self._B, H, self._cap, D))
        self._vbuf = like.new_empty((self._B, H, self._cap, D))
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._kbuf[:, :, : self._n]
        self.values = self._vbuf[:, :, : self._n]

    def lazy_initialization(self, key_states, value_states) -> None:
        self._alloc(key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        if self._kbuf is None:
            self._alloc(key_states)
        q = key_states.shape[-2]
        end = self._n + q
        if end > self._kbuf.shape[-2]:  # grow (rare: capacity is sized for the whole run)
            extra = max(end - self._kbuf.shape[-2], 64)
            pad = self._kbuf.new_empty(self._kbuf.shape[:2] + (extra, self._kbuf.shape[-1]))
            self._kbuf = torch.cat([self._kbuf, pad], dim=-2)
            self._vbuf = torch.cat([self._vbuf, pad.clone()], dim=-2)
        self._kbuf[:, :, self._n : end] = key_states
        self._vbuf[:, :, self._n : end] = value_states
        self._n = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._n + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._kbuf is not None:
            self._kbuf = self._kbuf[indices]
            self._vbuf = self._vbuf[indices]
            self._B = self._kbuf.shape[0]
            self._views()


def make_prealloc_cache(prefix_kv, batch: int, capacity: int):
    """A :class:`Cache` of :class:`PreallocatedLayer` s for ``batch`` rows of ``capacity`` positions, seeded with
    ``prefix_kv`` ((keys, values) per layer, or (None, None) for an empty cache), copied into every row."""
    layers: list[Any] = [PreallocatedLayer(k, v, batch, capacity) for k, v in prefix_kv]
    return Cache(layers=layers)
