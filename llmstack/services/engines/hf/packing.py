"""bfloat16 linear layers on a CPU run from weights reordered once into oneDNN's blocked layout.

torch's `F.linear` on a plain bfloat16 weight has oneDNN reorder the weight on every call, so a decode step
reads each weight twice: measured on Gemma 3 270M on a 2-core AMX host, a batch-1 step took 50.6 ms with the
plain weights and 40.4 ms with packed ones (16 rows: 66 and 62 ms), with the same tokens.  The packed weight
replaces the plain one (no second copy); the module keeps an empty `weight` of the same dtype, so `model.dtype`
and `model.device` still answer.  Layers whose weight another module shares (a tied LM head is the input
embedding too) and the output embeddings stay as they are, as does every quantised or non-CPU layer.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger("llmstack.engine.hf")

# The rows oneDNN lays the weight out for.  16 was faster than 1 at 1, 8 and 16 rows alike for Gemma's
# 640 x 2048 matrices (single matrices: 20-45% less time; a whole batch-1 step: 50.6 -> 48.9 ms, minimum of 3)
PACKED_FOR_ROWS = 16


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        dtype == torch.bfloat16
        and device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight, bias)` from the weight's packed copy (`packed_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered into oneDNN's blocked layout (a RuntimeError where oneDNN cannot take the shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)


def _shared_weights(model: Any) -> set[int]:
    """Storage addresses of weights that must keep their plain layout: the embeddings (input and output)."""
    keep = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None:
        keep.add(output.weight.data_ptr())
    return keep


def pack_linear_weights(model: Any, device: torch.device) -> int:
    """Pack the model's plain bfloat16 `nn.Linear` weights (see the module docstring); how many were packed."""
    if not packing_available(next(model.parameters()).dtype, device):
        return 0
    keep = _shared_weights(model)
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or weight is None or weight.dtype != torch.bfloat16:
            continue
        if weight.device.type != "cpu" or weight.data_ptr() in keep:
            continue
        try:
            blocked = packed_weight(weight)
        except RuntimeError as exc:  # an oneDNN that cannot reorder this shape: plain linear for all
            log.warning("cannot prepack bfloat16 linear weights (%s): they stay in the plain layout", exc)
            return packed
        bias = module.bias.detach() if module.bias is not None else None
        module.forward = functools.partial(packed_linear, blocked, bias)
        module.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
        packed += 1
    return packed
