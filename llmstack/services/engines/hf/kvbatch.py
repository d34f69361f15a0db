"""The KV cache of a running batch, for continuous batching over a transformers model.

Rows are sequences; columns are cache positions, left-padded so that every row's newest token sits in
the same column (a decode step appends one column for the whole batch).  Each layer's keys and values
live in one preallocated slab per layer that grows geometrically, so a decode step writes in place
instead of concatenating the whole cache (transformers' `DynamicLayer` copies it every step).

Sequences join by merging: each is prefilled alone (its prefill is exactly its solo prefill) and the
merge copies the batch once into a new slab.  Sequences leave by row selection, which also drops the
leading columns that only padding still uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

_GROWTH_MIN = 32  # spare columns reserved when a slab is (re)allocated


class SlabLayer(DynamicLayer):
    """One layer's keys/values in a (batch, heads, capacity, head_dim) slab; `length` columns are used."""

    def __init__(self) -> None:
        super().__init__()
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.length = 0
        self.reserve = 0  # spare columns to allocate on first use

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def set_slab(self, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> None:
        self.k_buf, self.v_buf, self.length = k_buf, v_buf, length
        self.dtype, self.device = k_buf.dtype, k_buf.device
        self.is_initialized = True
        self._publish()

    def _publish(self) -> None:
        assert self.k_buf is not None and self.v_buf is not None
        self.keys = self.k_buf[:, :, : self.length]
        self.values = self.v_buf[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if self.k_buf is None or end > self.k_buf.shape[2]:
            self._grow(key_states, end + max(self.reserve, _GROWTH_MIN, end // 4))
        assert self.k_buf is not None and self.v_buf is not None
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self._publish()
        return self.keys, self.values

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like.shape
        k = like.new_zeros((b, h, capacity, d))
        v = like.new_zeros((b, h, capacity, like.shape[-1] if self.v_buf is None else self.v_buf.shape[-1]))
        if self.k_buf is not None and self.v_buf is not None and self.length:
            k[:, :, : self.length] = self.k_buf[:, :, : self.length]
            v[:, :, : self.length] = self.v_buf[:, :, : self.length]
        self.k_buf, self.v_buf = k, v

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.k_buf = self.v_buf = self.keys = self.values = None
        self.length = 0
        self.is_initialized = False


def new_cache(num_layers: int) -> Cache:
    return Cache(layers=[SlabLayer() for _ in range(num_layers)])


def _slabs(cache: Cache) -> list[SlabLayer]:
    layers = cache.layers
    assert all(isinstance(layer, SlabLayer) for layer in layers)
    return layers  # type: ignore[return-value]


def cache_was_used(cache: Cache) -> bool:
    """Whether a forward pass wrote through this cache (models with their own legacy caches do not)."""
    layers = cache.layers
    return bool(layers) and all(isinstance(layer, SlabLayer) and layer.length > 0 for layer in layers)


class BatchKV:
    """The running batch's cache and attention mask; row i belongs to the i-th running sequence."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.cache: Cache = new_cache(num_layers)
        self.mask: torch.Tensor | None = None  # (rows, capacity) long, 1 where a real token is cached
        self.width = 0  # columns in use

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def slots(self) -> int:
        """Cache positions held (rows x padded width): what the token budget bounds."""
        return self.rows * self.width

    def step_mask(self) -> torch.Tensor:
        """The 2-D attention mask for a decode step, including the column it is about to write."""
        assert self.mask is not None
        self._ensure_capacity(self.width + 1)
        self.mask[:, self.width] = 1
        return self.mask[:, : self.width + 1]

    def advance(self) -> None:
        """After a decode step wrote one column in every layer."""
        self.width += 1

    def _ensure_capacity(self, columns: int) -> None:
        assert self.mask is not None
        if columns <= self.mask.shape[1]:
            return
        grown = self.mask.new_zeros((self.mask.shape[0], columns + max(_GROWTH_MIN, columns // 4)))
        grown[:, : self.width] = self.mask[:, : self.width]
        self.mask = grown

    def merge(self, prefilled: Sequence[Cache], reserve: int = _GROWTH_MIN) -> None:
        """Append rows: each cache holds one freshly prefilled sequence (batch dimension 1)."""
        if not prefilled:
            return
        old_layers = _slabs(self.cache) if self.rows else None
        new_lens = [_slabs(c)[0].length for c in prefilled]
        width = max([self.width, *new_lens])
        rows = self.rows + len(prefilled)
        capacity = width + max(reserve, _GROWTH_MIN)
        first = _slabs(prefilled[0])[0]
        assert first.k_buf is not None
        device = first.k_buf.device
        mask = torch.zeros((rows, capacity), dtype=torch.long, device=device)
        if self.mask is not None:
            mask[: self.rows, width - self.width : width] = self.mask[:, : self.width]
        for i, n in enumerate(new_lens):
            mask[self.rows + i, width - n : width] = 1
        merged = new_cache(self.num_layers)
        for li, layer in enumerate(_slabs(merged)):
            sample = _slabs(prefilled[0])[li]
            assert sample.k_buf is not None and sample.v_buf is not None
            _, h, _, dk = sample.k_buf.shape
            dv = sample.v_buf.shape[-1]
            k = sample.k_buf.new_zeros((rows, h, capacity, dk))
            v = sample.v_buf.new_zeros((rows, h, capacity, dv))
            if old_layers is not None:
                old = old_layers[li]
                assert old.k_buf is not None and old.v_buf is not None
                k[: self.rows, :, width - self.width : width] = old.k_buf[:, :, : self.width]
                v[: self.rows, :, width - self.width : width] = old.v_buf[:, :, : self.width]
            for i, c in enumerate(prefilled):
                src = _slabs(c)[li]
                n = src.length
                assert src.k_buf is not None and src.v_buf is not None
                k[self.rows + i, :, width - n : width] = src.k_buf[0, :, :n]
                v[self.rows + i, :, width - n : width] = src.v_buf[0, :, :n]
            layer.set_slab(k, v, width)
        self.cache, self.mask, self.width = merged, mask, width

    def select(self, keep: Sequence[int]) -> None:
        """Keep only these rows (in this order); drop columns that only padding uses any more."""
        if not keep:
            self.cache, self.mask, self.width = new_cache(self.num_layers), None, 0
            return
        assert self.mask is not None
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = mask[:, : self.width].any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.width
        width = self.width - start
        capacity = width + max(_GROWTH_MIN, width // 4)
        new_mask = mask.new_zeros((len(keep), capacity))
        new_mask[:, :width] = mask[:, start : self.width]
        for layer in _slabs(self.cache):
            assert layer.k_buf is not None and layer.v_buf is not None
            k_src = layer.k_buf[:, :, start : self.width].index_select(0, idx)
            v_src = layer.v_buf[:, :, start : self.width].index_select(0, idx)
            k = k_src.new_zeros((len(keep), k_src.shape[1], capacity, k_src.shape[3]))
            v = v_src.new_zeros((len(keep), v_src.shape[1], capacity, v_src.shape[3]))
            k[:, :, :width] = k_src
            v[:, :, :width] = v_src
            layer.set_slab(k, v, width)
        self.mask, self.width = new_mask, width
