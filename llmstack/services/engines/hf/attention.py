"""The attention function the batched engine runs a transformers model with: SDPA, with each layer's mask
taken from the slot cache's plan (`slots`, `masks`) while a batched forward runs on this thread.

It is registered in transformers' `AttentionInterface` (and transformers' own SDPA mask builder under the
same name, so that any other forward, e.g. an embedding, is masked exactly as with "sdpa").  A batched
forward passes a placeholder 4-D mask, which every model's mask helpers hand through untouched; the
layer's real mask comes from the plan by the layer's index, so the model's own mask code (which assumes
aligned rows) never runs.

Why not transformers' "sdpa": with any mask it repeats the keys/values of grouped-query attention to
every query head before calling SDPA (a copy of the whole cache per layer per step: 33 ms a layer for 16
rows of 600 positions with Gemma 3's 4:1 heads, measured on this CPU), where SDPA's `enable_gqa` takes a
mask on CPU at no such cost (1.5 ms).  Where torch's fused CPU kernel is slow (bfloat16 without AMX), a
forward computes attention as two matmuls instead (`kernels`, chosen at load).  Layers that need what
neither has (logit soft-capping, attention sinks) run the model's own eager attention with the same mask as
an additive one.

A compiled decode step (`compiled`) runs the model without a cache object: there this function writes the
new keys/values into the slot cache itself, inside one opaque op per layer (`_write_and_attend`).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from llmstack.services.engines.hf.kernels import SDPA_ONLY, AttentionKernels, Kernel, fits_matmul, matmul_attention

IMPLEMENTATION = "llmstack"
_active = threading.local()


def placeholder_mask(device: torch.device) -> torch.Tensor:
    """What a batched forward passes as `attention_mask`: 4-D, so transformers' mask helpers return it as is."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


class Batched:
    """`with Batched(kv, kernels): model(...)` runs that forward with the masks of `kv`'s plan, computing
    attention with `kernels`."""

    def __init__(self, kv: Any, kernels: AttentionKernels = SDPA_ONLY, writes: bool = False) -> None:
        self.kv, self.kernels, self.writes = kv, kernels, writes

    def __enter__(self) -> Batched:
        _active.kv, _active.kernels, _active.writes = self.kv, self.kernels, self.writes
        return self

    def __exit__(self, *exc: object) -> None:
        _active.kv, _active.kernels, _active.writes = None, SDPA_ONLY, False


def _plan_mask(module: Any) -> tuple[bool, torch.Tensor | None]:
    kv = getattr(_active, "kv", None)
    plan = getattr(kv, "plan", None)
    if plan is None:
        return False, None
    return True, plan.masks.for_window(kv.layout.windows[module.layer_idx])


def slot_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    special = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if torch.compiler.is_compiling():  # a compiled decode step (`compiled`): no cache object, written here
        if special:  # the model's eager attention needs the module: run outside the graph (a graph break)
            return _outside_the_graph(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _write_and_attend(query, key, value, module.layer_idx, float(scale)), None
    if getattr(_active, "writes", False):  # that forward, where it runs eagerly (outside its graph)
        key, value = _active.kv.slabs[module.layer_idx].update(key, value)
    planned, mask = _plan_mask(module)
    if not planned:  # an ordinary forward (no batch plan): exactly transformers' SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if special:
        return _eager(module, query, key, value, mask, dropout, scaling, **kwargs)
    return _attend(query, key, value, mask, dropout, scaling), None


_outside_the_graph = torch.compiler.disable(slot_attention)


@torch.library.custom_op("llmstack::write_and_attend", mutates_args=())
def _write_and_attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float
) -> torch.Tensor:
    """One layer of a compiled forward (which runs without a cache object): write the new keys/values into
    the active slot cache, then attend over its views.  Opaque to the compiler, so nothing the cache plans
    per step (lengths, columns, masks) is traced, and the graph never recompiles as rows grow."""
    kv = _active.kv
    keys, values = kv.slabs[layer].update(key, value)
    return _attend(query, keys, values, kv.plan.masks.for_window(kv.layout.windows[layer]), 0.0, scaling)


@_write_and_attend.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float) -> torch.Tensor:
    return query.new_empty((query.shape[0], query.shape[2], query.shape[1], value.shape[3]))


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attention over the slot cache's views with the active kernels, as (rows, queries, heads, dim)."""
    kernel = _active.kernels.for_queries(query.shape[2])
    if kernel == Kernel.MATMUL and fits_matmul(query, key):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return matmul_attention(query, key, value, mask, scale).transpose(1, 2).contiguous()
    groups, value_dtype = query.shape[1] // key.shape[1], value.dtype
    gqa = groups > 1
    if gqa and query.device.type != "cpu" and mask is not None:
        # CUDA's SDPA kernels take grouped heads only without a mask (transformers' `use_gqa_in_sdpa`)
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        gqa = False
    exact = _active.kernels.float32_sdpa
    if exact:
        query, key, value = query.float(), key.float(), value.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )
    if exact:
        out = out.to(value_dtype)
    return out.transpose(1, 2).contiguous()


def _eager(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The model's own eager attention (soft-capping, sinks) with the plan's mask made additive."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} needs eager attention but its module defines none")
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        additive.masked_fill_(~mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, additive, dropout=dropout, scaling=scaling, **kwargs)


def planned_forward(
    model: Any,
    kv: Any,
    ids: torch.Tensor,
    positions: torch.Tensor,
    new: list[int],
    kernels: AttentionKernels = SDPA_ONLY,
    **kwargs: Any,
) -> Any:
    """One planned forward over the first len(new) rows of `kv` (committed only if it succeeds)."""
    kv.begin(new, ids.shape[1])
    try:
        with Batched(kv, kernels):
            out = model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=placeholder_mask(ids.device),
                past_key_values=kv,
                use_cache=True,
                **kwargs,
            )
    except BaseException:
        kv.abandon()
        raise
    kv.end()
    return out


def register() -> None:
    """Make IMPLEMENTATION known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, slot_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
