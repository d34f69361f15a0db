"""Decode steps through a graph compiled with torch.compile (inductor) on a CPU.

Why: at decode sizes a small model's step is mostly per-op overhead and unfused elementwise work (norms,
rotary, activations, residuals), not the weights' bytes.  Measured on the 72M Llama of `bench/`, bfloat16,
packed weights, a 2-core AMX host, the model without its head: 1 row 12.2 ms a step eagerly, 10.7 ms
compiled; 32 rows 30.6 against 27.0 ms.

How: the model's forward is traced without a cache object.  Each layer's attention is one opaque op that
writes the new keys/values into the active slot cache and attends over it (`attention`), so nothing the
cache plans per step (lengths, columns, masks) enters the graph, and the graph does not recompile as rows
grow or come and go; oneDNN-packed linears are opaque ops too (`packing`).  Rows are a dynamic size: one
graph serves 1 row, one every larger batch (both compiled at load).  The LM head stays eager (`lm_head`
times its products at load; a graph break around it).  Prefill stays eager: its products are large, so
its overhead is small.

Compiling takes seconds to a minute at load, and needs a C++ compiler; where it fails, decode steps run
eagerly and the log says why.  `auto` compiles on a CPU for models of at least `AUTO_MIN_PARAMETERS`
outside the embeddings (a tiny model loads in a second, and compiling would take ten).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from llmstack.services.engines.hf.attention import Batched, placeholder_mask
from llmstack.services.engines.hf.kernels import AttentionKernels

log = logging.getLogger("llmstack.engine.hf")

AUTO_MIN_PARAMETERS = 20_000_000
CHOICES = ("auto", "on", "off")


def decoder_parameters(model: Any) -> int:
    """Parameters outside the embeddings and the LM head: what a step's per-layer work scales with (a
    tiny model with a large vocabulary is still tiny here).  Count before `packing` empties the linears."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if head is not None and getattr(head, "weight", None) is not None:
        skip.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def wanted(choice: str, parameters: int, device: torch.device) -> bool:
    """Whether to compile, for a model of `parameters` outside its embeddings (`decoder_parameters`)."""
    if choice == "off":
        return False
    if choice == "on":
        return True
    if device.type != "cpu":
        return False  # measured on CPUs only; vLLM is the engine for GPUs
    return parameters >= AUTO_MIN_PARAMETERS


class CompiledDecode:
    """`decode(kv, ids, positions)`: one decode step (every row of `kv` one token) through the compiled
    graph, committed only if it succeeds; last-position logits, (rows, vocabulary)."""

    def __init__(self, model: Any, kernels: AttentionKernels) -> None:
        self.model, self.kernels = model, kernels
        head = model.get_output_embeddings()
        if head is not None:  # the head's own products, timed at load, run eagerly
            head.forward = torch.compiler.disable(head.forward, recursive=True)
        self._graph = torch.compile(self._forward, dynamic=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
        return out.logits[:, -1]

    def __call__(self, kv: Any, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv.begin([1] * ids.shape[0], 1)
        try:
            with Batched(kv, self.kernels, writes=True):
                logits = self._graph(ids, positions, placeholder_mask(ids.device))
        except BaseException:
            kv.abandon()
            raise
        kv.end()
        return logits

    def warm_up(self, make_cache: Any, device: torch.device) -> float:
        """Compile both graphs (1 row, and more) on a scratch cache from `make_cache()`; seconds taken."""
        started = time.perf_counter()
        kv = make_cache()
        with torch.inference_mode():
            for rows in (1, 2, 3):
                while kv.rows < rows:
                    kv.add_row()
                ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
                positions = torch.tensor([[n] for n in kv.lengths], device=device)
                self(kv, ids, positions)
        return time.perf_counter() - started


def compile_decode(model: Any, kernels: AttentionKernels, make_cache: Any, device: torch.device) -> Any:
    """A compiled decode step, warmed up; None (and a log line saying why) where compiling fails."""
    try:
        decode = CompiledDecode(model, kernels)
        seconds = decode.warm_up(make_cache, device)
    except Exception as exc:  # no C++ compiler, an op inductor cannot take, ...: decode eagerly
        log.warning("decode steps run eagerly: compiling them failed (%s: %s)", type(exc).__name__, exc)
        return None
    log.info("decode steps run through a compiled graph (compiled in %.1fs)", seconds)
    return decode
