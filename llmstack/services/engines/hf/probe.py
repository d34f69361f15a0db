"""Whether the batched path can drive a model, decided once at load by running it: the model's cache
layout must be one the slot cache keeps (`layout`), its code must take transformers' attention interface,
and a two-row batch (different lengths, batched prefill, then a decode step) must reproduce the logits of
each sequence run alone through the model's own cache and attention.  The attention kernels are chosen
here too (`kernels`), and the batched check is repeated with them when they are not SDPA."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from llmstack.services.engines.hf import attention, kernels
from llmstack.services.engines.hf.kernels import SDPA_ONLY, AttentionKernels, HeadShape, Kernel
from llmstack.services.engines.hf.layout import KVLayout, LayerSpec, LayoutUnsupported, layout_of
from llmstack.services.engines.hf.slots import SlotKV

log = logging.getLogger("llmstack.engine.hf")


@dataclass
class Batchable:
    layout: KVLayout
    specs: list[LayerSpec]
    dtype: torch.dtype
    kernels: AttentionKernels = SDPA_ONLY


def _reference(model: Any, ids: list[int], device: torch.device) -> tuple[torch.Tensor, Any]:
    """Last-position logits of `ids` through the model's own cache, and that cache."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float(), cache


def _close(a: torch.Tensor, b: torch.Tensor, noise: float) -> bool:
    """Equal up to float32-level differences, or up to a few times the model's own disagreement with itself
    across batch shapes (`noise`: large in bfloat16, where a matmul's rounding depends on its shape)."""
    return bool(torch.allclose(a, b, rtol=1e-2, atol=max(1e-2 * float(b.abs().max()) + 1e-3, 4 * noise)))


def _self_noise(model: Any, ids: list[int], alone: torch.Tensor, device: torch.device) -> float:
    """How far the model's own logits move when the same sequence runs in other shapes: prefilled one
    token at a time through its own cache instead of at once."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    for token in ids:
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
    return float((out.logits[0, -1].float() - alone).abs().max())


def probe(model: Any, device: torch.device, kernel: Kernel = Kernel.AUTO) -> Batchable | str:
    """A `Batchable` (and the model switched to the slot attention), or why not (the model untouched)."""
    try:
        layout = layout_of(model.config)
    except LayoutUnsupported as exc:
        return str(exc)
    if not type(model)._can_set_attn_implementation():
        return "its code does not use transformers' attention interface"
    short, long = [1, 2], [3, 4, 5]
    try:
        ref_short, _ = _reference(model, [*short, 6], device)
        ref_long, cache = _reference(model, [*long, 6], device)
        noise = max(
            _self_noise(model, [*short, 6], ref_short, device), _self_noise(model, [*long, 6], ref_long, device)
        )
        layers = cache.layers
        if len(layers) != layout.num_layers or any(getattr(layer, "keys", None) is None for layer in layers):
            return "its code keeps its own legacy cache"
        specs = [LayerSpec(int(la.keys.shape[1]), int(la.keys.shape[3]), int(la.values.shape[3])) for la in layers]
        dtype = layers[0].keys.dtype
    except Exception as exc:
        return f"a forward pass through its own cache failed: {type(exc).__name__}: {exc}"
    original = model.config._attn_implementation
    attention.register()
    try:
        model.set_attn_implementation(attention.IMPLEMENTATION)
        got = _batched(model, layout, specs, dtype, device, [short, long])
    except Exception as exc:
        model.set_attn_implementation(original)
        return f"a batched forward pass failed: {type(exc).__name__}: {exc}"
    if not (_close(got[0], ref_short, noise) and _close(got[1], ref_long, noise)):
        model.set_attn_implementation(original)
        return "its batched output differs from its solo output (it ignores the attention mask or positions)"
    chosen = _kernels(model, layout, specs, dtype, device, kernel, [short, long], [ref_short, ref_long], noise)
    return Batchable(layout, specs, dtype, chosen)


def _kernels(
    model: Any,
    layout: KVLayout,
    specs: list[LayerSpec],
    dtype: torch.dtype,
    device: torch.device,
    requested: Kernel,
    rows: list[list[int]],
    refs: list[torch.Tensor],
    noise: float,
) -> AttentionKernels:
    """The attention kernels for this model (`kernels.choose`), checked like SDPA was: SDPA if they fail."""
    heads = getattr(model.config.get_text_config(), "num_attention_heads", None)
    if not isinstance(heads, int):  # cannot time it at this model's shape: the fused kernel, as before
        return SDPA_ONLY
    spec = specs[0]
    shape = HeadShape(heads, spec.heads, spec.key_dim, spec.value_dim)
    chosen = kernels.choose(shape, dtype, device, requested)
    if Kernel.MATMUL not in (chosen.decode, chosen.prefill):
        return chosen
    try:
        got = _batched(model, layout, specs, dtype, device, rows, chosen)
        # how far the model's own SDPA moves when computed in float32: the dtype's rounding, which another
        # kernel may show too (bfloat16 on an AVX2 CPU: 3.25 of 61, where SDPA's shape noise was 0)
        exact = _batched(model, layout, specs, dtype, device, rows, replace(SDPA_ONLY, float32_sdpa=True))
    except Exception as exc:  # noqa: BLE001 - logged; SDPA still works
        log.warning("matmul attention failed on this model (%s: %s): using SDPA", type(exc).__name__, exc)
        return SDPA_ONLY
    rounding = max(float((e - ref).abs().max()) for e, ref in zip(exact, refs, strict=True))
    if all(_close(g, ref, max(noise, rounding)) for g, ref in zip(got, refs, strict=True)):
        return chosen
    log.warning("matmul attention's output differs from the model's own on this model: using SDPA")
    return SDPA_ONLY


def _batched(
    model: Any,
    layout: KVLayout,
    specs: list[LayerSpec],
    dtype: torch.dtype,
    device: torch.device,
    rows: list[list[int]],
    chosen: AttentionKernels = SDPA_ONLY,
) -> list[torch.Tensor]:
    """Prefill `rows` together, then one decode step of token 6 for each: the decode step's logits."""
    kv = SlotKV(layout, specs, dtype, device, window_columns=(layout.window or 0) + 8)
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    pos = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        kv.add_row()
        ids[i, width - len(r) :] = torch.tensor(r, device=device)
        pos[i, width - len(r) :] = torch.arange(len(r), device=device)
    attention.planned_forward(model, kv, ids, pos, [len(r) for r in rows], chosen)
    step = torch.full((len(rows), 1), 6, dtype=torch.long, device=device)
    out = attention.planned_forward(
        model, kv, step, torch.tensor([[len(r)] for r in rows], device=device), [1] * len(rows), chosen
    )
    return [out.logits[i, -1].float() for i in range(len(rows))]
