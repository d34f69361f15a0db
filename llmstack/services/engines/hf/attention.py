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

    def __init__(self, kv: Any, kernels: AttentionKernels = SDPA_ONLY) -> None:
        self.kv, self.kernels = kv, kernels

    def __enter__(self) -> Batched:
        _active.kv, _active.kernels = self.kv, self.kernels
        return self

    def __exit__(self, *exc: object) -> None:
        _active.kv, _active.kernels = None, SDPA_ONLY


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
    planned, mask = _plan_mask(module)
    if not planned:  # an ordinary forward (no batch plan): exactly transformers' SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return _eager(module, query, key, value, mask, dropout, scaling, **kwargs)
    kernel = _active.kernels.for_queries(query.shape[2])
    if kernel == Kernel.MATMUL and fits_matmul(query, key):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return matmul_attention(query, key, value, mask, scale).transpose(1, 2).contiguous(), None
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
    return out.transpose(1, 2).contiguous(), None


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
