"""The 4-D attention masks of a forward through the slot cache (`slots`), one per kind of layer.

Each row has its own positions, so the masks are built from them, not from a shared offset as
transformers' `masking_utils` does for aligned batches; the rules are transformers' own: a query at
position q sees key positions p <= q (`causal_mask_function`), and a sliding layer of window W only
those with p > q - W (`sliding_window_overlay`).  Masks are boolean, (rows, 1, queries, keys), True
where attention is allowed; None when nothing is masked (SDPA then takes its unmasked path).  A
padding query (left padding of a chunk) sees its row's first key, so that its throw-away output stays
finite: a fully masked row makes SDPA return NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmstack.services.engines.hf.layout import KVLayout


@dataclass
class ForwardMasks:
    """Masks by window (None: full attention); `window_from` is the first window-slab column the
    window layers read (the view starts there)."""

    by_window: dict[int | None, torch.Tensor | None] = field(default_factory=dict)
    window_from: int = 0

    def for_window(self, window: int | None) -> torch.Tensor | None:
        return self.by_window[window]


def _or_none(mask: torch.Tensor) -> torch.Tensor | None:
    return None if bool(mask.all()) else mask


def decode_masks(layout: KVLayout, lengths: list[int], after: list[int], device: torch.device) -> ForwardMasks:
    """One new token per row, at position lengths[r]; window layers hold `after[r]` columns once it is written."""
    out = ForwardMasks()
    if layout.full_layers:
        if min(lengths) == max(lengths):  # aligned rows (e.g. one): every column is seen
            out.by_window[None] = None
        else:
            pos = torch.tensor(lengths, device=device)
            cols = torch.arange(max(lengths) + 1, device=device)
            out.by_window[None] = (cols[None, :] <= pos[:, None]).view(len(lengths), 1, 1, -1)
    if layout.window:
        out.window_from = max(0, min(a - layout.window for a in after))
        windows = {w for w in layout.windows if w is not None}
        if min(after) == max(after) and windows == {layout.window}:  # the view is exactly each row's window
            out.by_window[layout.window] = None
            return out
        held = torch.tensor(after, device=device)
        cols = torch.arange(out.window_from, max(after), device=device)
        for window in windows:
            mask = (cols[None, :] >= held[:, None] - window) & (cols[None, :] < held[:, None])
            out.by_window[window] = _or_none(mask.view(len(after), 1, 1, -1))
    return out


def chunk_masks(
    layout: KVLayout, lengths: list[int], new: list[int], after: list[int], width: int, device: torch.device
) -> ForwardMasks:
    """Row r brings new[r] tokens right-aligned in `width` input columns, at positions lengths[r] onwards;
    its window run then holds `after[r]` columns, ending at its newest position."""
    n = len(lengths)
    start = torch.tensor(lengths, device=device)
    count = torch.tensor(new, device=device)
    q = torch.arange(width, device=device)
    real = q[None, :] >= (width - count)[:, None]  # (rows, queries)
    qpos = start[:, None] + q[None, :] - (width - count)[:, None]
    out = ForwardMasks()
    if layout.full_layers:
        cols = torch.arange(int((start + count).max()), device=device)
        mask = real[:, :, None] & (cols[None, None, :] <= qpos[:, :, None])
        mask[:, :, 0] |= ~real
        out.by_window[None] = mask.view(n, 1, width, -1)
    if layout.window:
        held = torch.tensor(after, device=device)
        cols = torch.arange(max(after), device=device)
        # window column j of row r holds position (lengths + new - after)[r] + j
        kpos = (start + count - held)[:, None] + cols[None, :]  # (rows, keys)
        present = cols[None, :] < held[:, None]
        seen = real[:, :, None] & present[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
        for window in {w for w in layout.windows if w is not None}:
            mask = seen & (kpos[:, None, :] > qpos[:, :, None] - window)
            mask[:, :, 0] |= ~real
            out.by_window[window] = mask.view(n, 1, width, -1)
    return out
