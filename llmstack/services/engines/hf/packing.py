"""Linear layers on a CPU run from weights reordered once into oneDNN's blocked layout.

bfloat16: torch's `F.linear` on a plain weight has oneDNN reorder the weight on every call, so a decode step
reads each weight twice: measured on Gemma 3 270M on a 2-core AMX host, a batch-1 step took 50.6 ms with the
plain weights and 40.4 ms with packed ones (16 rows: 66 and 62 ms), with the same tokens.

float32: `F.linear` runs MKL, whose one-row product (a decode step at batch 1) uses one core: on a 2-core
AVX2 host Gemma 3 270M's 126 decoder matrices took 25-31 ms a step at 1 row, packed 17 ms; at 8 rows 48-64
against 25 ms, at 16 rows 59-75 against 38 ms; a 512-token prefill chunk about the same.  A packed row's
values are also the same bits whatever the batch (measured 1 to 40 rows; MKL's are not).  Whether it pays
depends on the CPU, so float32 weights stay plain where timing at load finds packing clearly slower
(`_packing_pays`; not merely "not faster": a load beside other busy processes times noisily, and there the
one-row figures once came out reversed).

The packed weight replaces the plain one (no second copy); the module keeps an empty `weight` of the same
dtype, so `model.dtype` and `model.device` still answer.  Layers whose weight another module shares (a tied
LM head is the input embedding too) and the output embeddings stay as they are, as does every quantised or
non-CPU layer.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any

import torch

log = logging.getLogger("llmstack.engine.hf")

# The rows oneDNN lays the weight out for.  16 was faster than 1 at 1, 8 and 16 rows alike for Gemma's
# 640 x 2048 matrices (single matrices: 20-45% less time; a whole batch-1 step: 50.6 -> 48.9 ms, minimum of 3)
PACKED_FOR_ROWS = 16


# float32 weights stay plain only when their packed products take more than this multiple of MKL's time
_PACKED_SLOWER_BY = 1.15
_TIMED_BYTES = 64 * 2**20  # weights timed at load: more than a CPU cache holds, as a decode step streams them


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight, bias)` from the weight's packed copy (`packed_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# A compiled graph (`compiled`) cannot take oneDNN's opaque tensors as inputs: there a packed linear is an
# opaque op that finds its weight by number.  Weak values: the table never keeps an unloaded model's weights.
_BY_NUMBER: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_BIAS_BY_NUMBER: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_numbers = itertools.count()


@torch.library.custom_op("llmstack::packed_linear", mutates_args=())
def _numbered_packed_linear(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    return packed_linear(_BY_NUMBER[number], _BIAS_BY_NUMBER.get(number), x)


@_numbered_packed_linear.register_fake
def _(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> Any:
    """A packed module's `forward`: oneDNN's product directly, or the numbered op inside a compiled graph."""
    number = next(_numbers)
    _BY_NUMBER[number] = packed
    if bias is not None:
        _BIAS_BY_NUMBER[number] = bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _numbered_packed_linear(x, number, out_features)
        return packed_linear(packed, bias, x)

    return forward


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


def _packable(model: Any, dtype: torch.dtype) -> list[torch.nn.Linear]:
    keep = _shared_weights(model)
    found = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or weight is None or weight.dtype != dtype:
            continue
        if weight.device.type != "cpu" or weight.data_ptr() in keep:
            continue
        found.append(module)
    return found


def _packing_pays(linears: list[torch.nn.Linear]) -> tuple[bool, str]:
    """Whether the packed products are not clearly slower than `F.linear` on this CPU, timed on the model's
    first linears (at least `_TIMED_BYTES` of them) at 1 and 8 rows, as decode steps run them."""
    from llmstack.services.engines.hf.kernels import fastest_seconds

    timed, size = [], 0
    for module in linears:
        timed.append(module)
        size += module.weight.numel() * module.weight.element_size()
        if size >= _TIMED_BYTES:
            break
    try:
        packed = [packed_weight(m.weight) for m in timed]
    except RuntimeError as exc:
        return False, f"oneDNN cannot reorder them: {exc}"
    notes, plain_total, packed_total = [], 0.0, 0.0
    with torch.inference_mode():
        for rows in (1, 8):
            inputs = {m.in_features: torch.zeros(rows, m.in_features, dtype=m.weight.dtype) for m in timed}

            def plain(inputs: dict = inputs) -> None:
                for m in timed:
                    torch.nn.functional.linear(inputs[m.in_features], m.weight)

            def blocked(inputs: dict = inputs) -> None:
                for m, p in zip(timed, packed, strict=True):
                    packed_linear(p, None, inputs[m.in_features])

            plain_s, packed_s = fastest_seconds([plain, blocked], runs=9)
            plain_total, packed_total = plain_total + plain_s, packed_total + packed_s
            notes.append(f"{rows} row{'s' if rows > 1 else ''} {packed_s * 1e3:.1f} vs {plain_s * 1e3:.1f} ms")
    why = f"timed at load on {len(timed)} matrices, packed vs F.linear: " + ", ".join(notes)
    return packed_total <= _PACKED_SLOWER_BY * plain_total, why


def pack_linear_weights(model: Any, device: torch.device, timed: bool = True) -> int:
    """Pack the model's plain bfloat16 or float32 `nn.Linear` weights where oneDNN can (bfloat16) and where it
    pays (float32: timed here unless `timed` is False; see the module docstring); how many were packed."""
    dtype = next(model.parameters()).dtype
    if not packing_available(dtype, device):
        return 0
    linears = _packable(model, dtype)
    if dtype == torch.float32 and linears and timed:
        pays, why = _packing_pays(linears)
        log.info("float32 linear weights %s for oneDNN (%s)", "packed" if pays else "left plain", why)
        if not pays:
            return 0
    packed = 0
    for module in linears:
        weight = module.weight
        try:
            blocked = packed_weight(weight)
        except RuntimeError as exc:  # an oneDNN that cannot reorder this shape: plain linear for all
            log.warning("cannot prepack %s linear weights (%s): they stay in the plain layout", dtype, exc)
            return packed
        bias = module.bias.detach() if module.bias is not None else None
        module.forward = _packed_forward(blocked, bias, module.out_features)
        module.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
        packed += 1
    return packed
