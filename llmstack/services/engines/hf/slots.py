"""The KV cache of a batch of sequences for continuous batching over a transformers model: one slot (row)
per sequence, explicit per-row positions, and the 4-D attention masks that follow from them (`masks`).

Why slots and not left-padded slabs: with slabs every row's newest token sits in the same column, so a
sequence that joins or leaves forces a copy of the whole batch into a re-aligned slab.  Here a row keeps
its own columns: a sequence joins by copying only its own keys/values into a free slot, leaves by moving
the last row into its slot, and each forward writes every row's new tokens at that row's own columns.

Layout, per layer (tensors of (rows, heads, columns, head_dim), preallocated, grown geometrically):
- full attention: column p holds position p; a row uses columns [0, length).
- sliding window W: a row keeps a linear run of its newest positions, at most `window_columns` of them;
  when the run would overflow, the row's last W-1 positions move to the front (what the next query still
  sees).  So the cache holds at most the window (plus a little spare, to move rarely), and attention over
  a window layer spans at most `window_columns` columns however long the sequence grows.

A forward over the batch is planned first (`begin`): how many new tokens each row brings (left-padded
into the input), where each lands, and the masks; the layers' `update` then writes only real tokens
(padding never reaches the cache) and returns views of the slabs, no copies; `end` commits the lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from llmstack.services.engines.hf.layout import KVLayout, LayerSpec
from llmstack.services.engines.hf.masks import ForwardMasks, chunk_masks, decode_masks

_SPARE_COLUMNS = 32  # reserved when full-attention slabs grow
DECODE_WINDOW_SPARE = 64  # window columns beyond the window in a decoding batch: a row's run moves every 64 steps


@dataclass
class Span:
    """Keys/values of positions [start, end) of one sequence, outside any batch (the prefix cache's
    unit).  `full[i]` is full-attention layer i's (keys, values), each (heads, end - start, dim);
    `window[j]` window layer j's for positions [window_start, end) only."""

    start: int
    end: int
    full: list[tuple[torch.Tensor, torch.Tensor]]
    window_start: int
    window: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def positions(self, layout: KVLayout) -> float:
        """Cache positions held, averaged over layers (the token budget's unit)."""
        full, n = len(layout.full_layers), max(1, layout.num_layers)
        return (full * (self.end - self.start) + (n - full) * (self.end - self.window_start)) / n


@dataclass
class RowSource:
    """One row of a batch, as the prefix cache copies from it (window layers: at most `keep` positions
    per entry)."""

    kv: SlotKV
    row: int
    keep: int

    def span(self, start: int) -> Span:
        return self.kv.export_span(self.row, start, self.keep)

    def window_held_from(self) -> int:
        return self.kv.window_held_from(self.row)

    def window(self, lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.kv.export_window(self.row, lo, hi)


@dataclass
class _Plan:
    rows: int
    width: int
    new: list[int]
    full_len: int
    window_from: int
    window_to: int
    dst_rows: torch.Tensor
    full_cols: torch.Tensor
    window_cols: torch.Tensor
    src_rows: torch.Tensor | None  # None: decode (every row one token, at input column 0)
    src_cols: torch.Tensor | None
    masks: ForwardMasks
    flat: dict[tuple[bool, int, int], torch.Tensor] = field(default_factory=dict)  # see _flat_index


class _SlotLayer(CacheLayerMixin):
    """One layer's slab; `owner` holds the rows, lengths and the current forward's plan."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: SlotKV, spec: LayerSpec, columns: int, window: int | None) -> None:
        super().__init__()
        self.owner = owner
        self.window = window
        self.is_sliding = window is not None
        rows = owner.row_capacity
        self.k = torch.zeros((rows, spec.heads, columns, spec.key_dim), dtype=owner.dtype, device=owner.device)
        self.v = torch.zeros((rows, spec.heads, columns, spec.value_dim), dtype=owner.dtype, device=owner.device)
        self.dtype, self.device = owner.dtype, owner.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front from the model's measured layer shapes

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.owner.plan
        if plan is None:
            raise RuntimeError("a forward through the slot cache needs a plan (SlotKV.begin)")
        index = self._flat_index(plan)
        if plan.src_rows is None:
            keys, values = key_states[:, :, 0], value_states[:, :, 0]
        else:
            keys = key_states[plan.src_rows, :, plan.src_cols]
            values = value_states[plan.src_rows, :, plan.src_cols]
        # one index_copy_ into the flattened slab (rows*heads*columns, dim): far cheaper per step than
        # advanced-index assignment
        self.k.view(-1, self.k.shape[3]).index_copy_(0, index, keys.reshape(-1, self.k.shape[3]))
        self.v.view(-1, self.v.shape[3]).index_copy_(0, index, values.reshape(-1, self.v.shape[3]))
        n = plan.rows
        if self.is_sliding:
            return self.k[:n, :, plan.window_from : plan.window_to], self.v[:n, :, plan.window_from : plan.window_to]
        return self.k[:n, :, : plan.full_len], self.v[:n, :, : plan.full_len]

    def _flat_index(self, plan: _Plan) -> torch.Tensor:
        """Row-major positions in the flattened slab of every (new token, head) the plan writes; shared by
        the layers of one shape."""
        heads, columns = self.k.shape[1], self.k.shape[2]
        key = (self.is_sliding, heads, columns)
        index = plan.flat.get(key)
        if index is None:
            cols = plan.window_cols if self.is_sliding else plan.full_cols
            head = torch.arange(heads, device=cols.device)
            index = ((plan.dst_rows[:, None] * heads + head[None, :]) * columns + cols[:, None]).reshape(-1)
            plan.flat[key] = index
        return index

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(self.owner.lengths, default=0) + query_length, 0

    def get_seq_length(self) -> int:
        return max(self.owner.lengths, default=0)

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def resize(self, rows: int, columns: int) -> None:
        """New capacity; what the rows in use hold is kept.  Only the rows and columns in use are copied
        (nothing else is read unmasked), so an emptied cache regrows with no copy at all."""
        used_rows, used_cols = self.owner.used(self.is_sliding)
        keep_rows, keep_cols = min(rows, used_rows), min(columns, used_cols)
        k = self.k.new_zeros((rows, self.k.shape[1], columns, self.k.shape[3]))
        v = self.v.new_zeros((rows, self.v.shape[1], columns, self.v.shape[3]))
        if keep_rows and keep_cols:
            k[:keep_rows, :, :keep_cols] = self.k[:keep_rows, :, :keep_cols]
            v[:keep_rows, :, :keep_cols] = self.v[:keep_rows, :, :keep_cols]
        self.k, self.v = k, v


class SlotKV(Cache):
    """A batch's cache: `rows` sequences, row i at `lengths[i]` positions (`counts[i]` of them held by the
    window layers).  Rows are contiguous (0..rows-1), so every forward reads plain views of the slabs."""

    def __init__(
        self,
        layout: KVLayout,
        specs: list[LayerSpec],
        dtype: torch.dtype,
        device: torch.device,
        window_columns: int = 0,
        rows: int = 4,
        columns: int = 64,
    ) -> None:
        self.layout, self.dtype, self.device = layout, dtype, device
        self.window = layout.window
        self.window_columns = max(window_columns, (self.window or 0) + 1) if self.window else 0
        self.row_capacity = max(1, rows)
        self.lengths: list[int] = []
        self.counts: list[int] = []
        self.plan: _Plan | None = None
        layers = [
            _SlotLayer(self, spec, self.window_columns if w is not None else columns, w)
            for spec, w in zip(specs, layout.windows, strict=True)
        ]
        super().__init__(layers=layers)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def slabs(self) -> list[_SlotLayer]:
        return self.layers  # type: ignore[return-value]

    def used(self, sliding: bool) -> tuple[int, int]:
        """Rows in use, and the columns any of them uses in a window (`sliding`) or full-attention slab."""
        held = self.counts if sliding else self.lengths
        return len(held), max(held, default=0)

    def positions(self) -> float:
        """Cache positions the batch holds as attention reads it (rows x the longest row), averaged over
        layers: what the token budget bounds."""
        if not self.lengths:
            return 0.0
        return self.rows * self.layout.held_positions(max(self.lengths), max(self.counts))

    # -- rows -----------------------------------------------------------------------------------------------
    def add_row(self) -> int:
        if self.rows == self.row_capacity:
            self.row_capacity *= 2
            for layer in self.slabs:
                layer.resize(self.row_capacity, layer.k.shape[2])
        self.lengths.append(0)
        self.counts.append(0)
        return self.rows - 1

    def remove_row(self, row: int) -> int | None:
        """Drop a row; the last row moves into its slot.  Returns the index that moved (None if none)."""
        last = self.rows - 1
        moved = None
        if row != last:
            self._copy_within(last, row)
            self.lengths[row], self.counts[row] = self.lengths[last], self.counts[last]
            moved = last
        self.lengths.pop()
        self.counts.pop()
        if not self.lengths:
            self._shrink()
        return moved

    def _copy_within(self, src: int, dst: int) -> None:
        n, c = self.lengths[src], self.counts[src]
        for layer in self.slabs:
            used = c if layer.is_sliding else n
            layer.k[dst, :, :used] = layer.k[src, :, :used]
            layer.v[dst, :, :used] = layer.v[src, :, :used]

    def _shrink(self) -> None:
        """An empty batch gives its memory back, down to a small slab."""
        full_cols = 64
        for layer in self.slabs:
            if layer.k.shape[0] > 4 or (not layer.is_sliding and layer.k.shape[2] > full_cols):
                layer.resize(4, layer.k.shape[2] if layer.is_sliding else full_cols)
        self.row_capacity = 4

    def take_row(self, other: SlotKV, row: int) -> int:
        """Append a copy of another batch's row (a sequence moving from prefill to decode)."""
        dst = self.add_row()
        n, have = other.lengths[row], other.counts[row]
        keep = min(have, self.window_columns - 1) if self.window else 0
        self._ensure_columns(n)
        for mine, theirs in zip(self.slabs, other.slabs, strict=True):
            if mine.is_sliding:
                mine.k[dst, :, :keep] = theirs.k[row, :, have - keep : have]
                mine.v[dst, :, :keep] = theirs.v[row, :, have - keep : have]
            else:
                mine.k[dst, :, :n] = theirs.k[row, :, :n]
                mine.v[dst, :, :n] = theirs.v[row, :, :n]
        self.lengths[dst], self.counts[dst] = n, keep
        return dst

    def _ensure_columns(self, needed: int) -> None:
        for layer in self.slabs:
            if not layer.is_sliding and layer.k.shape[2] < needed:
                layer.resize(layer.k.shape[0], needed + max(_SPARE_COLUMNS, needed // 4))

    # -- prefix spans ---------------------------------------------------------------------------------------
    def export_span(self, row: int, start: int, window_keep: int) -> Span:
        """Copies of a row's positions [start, length) (window layers: at most the newest `window_keep`)."""
        n, have = self.lengths[row], self.counts[row]
        window_start = max(start, n - have, n - window_keep) if self.window else n
        full, window = [], []
        for layer in self.slabs:
            if layer.is_sliding:
                lo = have - (n - window_start)
                window.append((layer.k[row, :, lo:have].clone(), layer.v[row, :, lo:have].clone()))
            else:
                full.append((layer.k[row, :, start:n].clone(), layer.v[row, :, start:n].clone()))
        return Span(start, n, full, window_start, window)

    def export_window(self, row: int, lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the window layers' positions [lo, hi) of a row (they must be held: `window_held_from`)."""
        n, have = self.lengths[row], self.counts[row]
        first = n - have
        if lo < first or hi > n:
            raise ValueError(f"row {row} holds window positions [{first}, {n}), not [{lo}, {hi})")
        a, b = lo - first, hi - first
        return [(la.k[row, :, a:b].clone(), la.v[row, :, a:b].clone()) for la in self.slabs if la.is_sliding]

    def window_held_from(self, row: int) -> int:
        """The first position a row's window layers still hold."""
        return self.lengths[row] - self.counts[row] if self.window else self.lengths[row]

    def import_prefix(self, row: int, spans: list[Span], length: int) -> None:
        """Fill a fresh row with the first `length` positions of a chain of spans (a prefix cache hit).
        Window layers get the positions the next query still sees; the spans must hold them."""
        self._ensure_columns(length)
        keep = min(length, self.window - 1, self.window_columns - 1) if self.window else 0
        first = length - keep
        for span in spans:
            end = min(span.end, length)
            if end <= span.start:
                break
            fi = wi = 0
            for layer in self.slabs:
                if layer.is_sliding:
                    lo = max(first, span.window_start)
                    if lo < end:
                        k, v = span.window[wi]
                        src = slice(lo - span.window_start, end - span.window_start)
                        layer.k[row, :, lo - first : end - first] = k[:, src]
                        layer.v[row, :, lo - first : end - first] = v[:, src]
                    wi += 1
                else:
                    k, v = span.full[fi]
                    layer.k[row, :, span.start : end] = k[:, : end - span.start]
                    layer.v[row, :, span.start : end] = v[:, : end - span.start]
                    fi += 1
        self.lengths[row], self.counts[row] = length, keep

    # -- a forward ------------------------------------------------------------------------------------------
    def begin(self, new: list[int], width: int) -> None:
        """Plan a forward over rows 0..len(new)-1 (the first rows; the others sit it out): row i brings
        `new[i]` >= 1 tokens, right-aligned in an input of `width` columns (left padding), at positions
        lengths[i] onwards."""
        n = len(new)
        if not 0 < n <= self.rows or min(new) < 1 or max(new) > width:
            raise ValueError(f"cannot plan {new} new tokens in {width} columns over {self.rows} rows")
        lengths = self.lengths[:n]
        self._ensure_columns(max(length + c for length, c in zip(lengths, new, strict=True)))
        if self.window:
            self._make_window_room(new)
        counts = self.counts[:n]
        device = self.device
        if width == 1:
            dst_rows = torch.arange(n, device=device)
            full_cols = torch.tensor(lengths, device=device)
            window_cols = torch.tensor(counts, device=device) if self.window else full_cols
            src_rows = src_cols = None
        else:
            rows_l, q_l, full_l, win_l = [], [], [], []
            for r, c in enumerate(new):
                rows_l += [r] * c
                q_l += range(width - c, width)
                full_l += range(lengths[r], lengths[r] + c)
                win_l += range(counts[r], counts[r] + c)
            dst_rows = torch.tensor(rows_l, device=device)
            full_cols = torch.tensor(full_l, device=device)
            window_cols = torch.tensor(win_l, device=device) if self.window else full_cols
            src_rows, src_cols = dst_rows, torch.tensor(q_l, device=device)
        after = [c + k for c, k in zip(counts, new, strict=True)]
        if width == 1:
            masks = decode_masks(self.layout, lengths, after, device)
        else:
            masks = chunk_masks(self.layout, lengths, new, after, width, device)
        self.plan = _Plan(
            rows=n,
            width=width,
            new=list(new),
            full_len=max(length + c for length, c in zip(lengths, new, strict=True)),
            window_from=masks.window_from,
            window_to=max(after) if self.window else 0,
            dst_rows=dst_rows,
            full_cols=full_cols,
            window_cols=window_cols,
            src_rows=src_rows,
            src_cols=src_cols,
            masks=masks,
        )

    def end(self) -> None:
        """Commit the planned forward (it ran)."""
        plan = self.plan
        assert plan is not None
        for r, c in enumerate(plan.new):
            self.lengths[r] += c
            if self.window:
                self.counts[r] += c
        self.plan = None

    def abandon(self) -> None:
        """The planned forward failed: nothing was committed (rows keep their previous lengths)."""
        self.plan = None

    def _make_window_room(self, new: list[int]) -> None:
        """Room in the window slabs for every row's new tokens: a row whose run would overflow keeps only
        its newest W-1 positions, moved to the front (a state as valid as any, so it is committed now)."""
        assert self.window is not None
        need = max((self.window - 1) + c for c in new)
        if need > self.window_columns:  # a chunk larger than the slabs were sized for
            self.window_columns = need + DECODE_WINDOW_SPARE
            for layer in self.slabs:
                if layer.is_sliding:
                    layer.resize(layer.k.shape[0], self.window_columns)
        counts = self.counts
        for r, c in enumerate(new):
            if counts[r] + c > self.window_columns:
                keep = min(counts[r], self.window - 1)
                lo = counts[r] - keep
                for layer in self.slabs:
                    if layer.is_sliding:
                        layer.k[r, :, :keep] = layer.k[r, :, lo : counts[r]].clone()
                        layer.v[r, :, :keep] = layer.v[r, :, lo : counts[r]].clone()
                counts[r] = keep
