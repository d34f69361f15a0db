"""Which attention each layer of a transformers model uses, read the way transformers' own caches read it.

Two kinds of layers can be batched by the slot cache (`slots`): full attention (every past position) and
sliding-window attention (the last `window` positions, the query's own included, as transformers'
`sliding_window_overlay` defines it).  Models mix them per layer (Gemma 2/3: five sliding layers to one full
one; Mistral: all sliding; GPT-OSS: alternating).  Recurrent, convolutional and chunked-attention layers
carry state the slot cache does not model: such models run one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class LayerSpec:
    """One layer's cache shape: key/value heads and head sizes, as the model's forward writes them."""

    heads: int
    key_dim: int
    value_dim: int


@dataclass(frozen=True)
class KVLayout:
    """Per layer: its window (None for full attention)."""

    windows: tuple[int | None, ...]

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @property
    def window(self) -> int | None:
        """The largest window of any sliding layer (what the window slabs are sized for), or None."""
        sliding = [w for w in self.windows if w is not None]
        return max(sliding) if sliding else None

    @property
    def full_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.windows) if w is None]

    @property
    def window_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.windows) if w is not None]

    @property
    def mixed(self) -> bool:
        return len(set(self.windows)) > 1

    def describe(self) -> str:
        full, sliding = len(self.full_layers), len(self.window_layers)
        if not sliding:
            return f"{full} full-attention layers"
        windows = sorted({w for w in self.windows if w is not None})
        what = f"{sliding} sliding-window layers (window {', '.join(map(str, windows))})"
        return what if not full else f"{full} full-attention and {what}"

    def held_positions(self, length: int, window_columns: int) -> float:
        """Cache positions one row of `length` tokens holds, averaged over layers (a full layer holds every
        position, a window layer `window_columns` of them): the unit of the token budget."""
        full = len(self.full_layers)
        return (full * length + (self.num_layers - full) * min(length, window_columns)) / max(1, self.num_layers)


class LayoutUnsupported(ValueError):
    """The model has layers the slot cache cannot batch; the message says which."""


def layout_of(model_config: Any) -> KVLayout:
    """The layout of a model's decoder, or `LayoutUnsupported` with the reason."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = model_config.get_text_config(decoder=True)
    num_layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    if num_layers <= 0:
        raise LayoutUnsupported("its config does not say how many layers it has")
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except Exception as exc:  # remote code with a config transformers' cache helpers cannot read
        raise LayoutUnsupported(f"transformers cannot read its layer types ({type(exc).__name__}: {exc})") from None
    types = list(types)
    if len(types) != num_layers:
        raise LayoutUnsupported(f"{num_layers - len(types)} of its layers share another layer's cache")
    other = sorted({t for t in types if t not in (FULL, SLIDING)})
    if other:
        raise LayoutUnsupported(f"it has {', '.join(other)} layers (state the slot cache does not keep)")
    windows: list[int | None] = []
    for kind, extra in zip(types, kwargs, strict=True):
        window = extra.get("sliding_window") if kind == SLIDING else None
        if kind == SLIDING and not (isinstance(window, int) and window > 0):
            raise LayoutUnsupported(f"a sliding-window layer has no usable window ({window!r})")
        windows.append(window)
    return KVLayout(tuple(windows))
