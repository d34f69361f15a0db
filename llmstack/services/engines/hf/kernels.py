"""The two kernels a planned forward can compute attention with, and the choice between them at load.

- `sdpa`: torch's fused `scaled_dot_product_attention`. Memory-light (it never holds the scores) and the
  fastest where its CPU kernel has matrix units to run on (measured on an AMX host, 32 rows x 12 heads x
  50-110 positions in bfloat16: 255-613 us a layer, against 1,186-2,112 us for two matmuls).
- `matmul`: two batched matmuls around a float32 softmax. On a CPU with AVX512-BF16 but no AMX, torch's
  fused kernel is far slower in bfloat16 (measured on an AMD EPYC: 2,846 against 277 us a layer for 32
  rows x 12 heads x 100 positions, 10,042 against 293 us for Gemma 3's 16 rows x 4:1 heads x 600).

Which is faster depends on the CPU, so the engine times both once, at load, on the model's own head shapes
(`choose`), for decoding (one query per row) and for prefill, and logs what it picked; `--attention-kernel`
overrides it.  Only reduced-precision dtypes on a CPU are timed: in float32 the two are within about 20% of
each other everywhere measured, and greedy output is compared token for token in float32, so it keeps
the one kernel.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("llmstack.engine.hf")

# Scores a matmul forward may hold at once (rows x query heads x queries x keys): about 12 bytes each across
# the bfloat16 scores, their float32 softmax and its bfloat16 copy.  Larger prefill chunks take SDPA.
MATMUL_SCORES_LIMIT = 8 * 1024 * 1024
_FASTER_BY = 0.7  # matmul is picked only when it takes at most this fraction of SDPA's time


class Kernel(enum.StrEnum):
    AUTO = "auto"  # time both at load (`choose`)
    SDPA = "sdpa"
    MATMUL = "matmul"


@dataclass(frozen=True)
class AttentionKernels:
    decode: Kernel = Kernel.SDPA
    prefill: Kernel = Kernel.SDPA
    why: str = ""
    float32_sdpa: bool = False  # SDPA on float32 copies whatever the dtype: the probe's yardstick for rounding

    def for_queries(self, queries: int) -> Kernel:
        return self.decode if queries == 1 else self.prefill

    def describe(self) -> str:
        picked = f"decode {self.decode}, prefill {self.prefill}"
        return f"{picked} ({self.why})" if self.why else picked


SDPA_ONLY = AttentionKernels()


def matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention as two matmuls, (rows, heads, queries, value_dim) like SDPA's output.  The query heads of
    a group sit next to their key/value head as extra query rows (4-D matmuls: broadcasting the keys over
    the group would copy them); a mask is boolean, (rows, 1, queries, keys), True where attention is
    allowed, and no row of it is all False (`masks`)."""
    rows, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # the cache hands over views of its slabs (rows padded to more columns than used): torch's batched
    # matmul on such strided batches was 4.8x slower than on a compact copy, which costs far less (32 rows x
    # 12 heads x 100 positions, one thread: 2.8 ms against 0.57 ms, plus 0.15 ms for the copy)
    key, value = key.contiguous(), value.contiguous()
    q = query.reshape(rows, kv_heads, groups * queries, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float()  # (rows, kv_heads, groups x queries, keys)
    scores.mul_(scale)
    if mask is not None:
        grouped = scores.view(rows, kv_heads, groups, queries, keys)
        grouped.masked_fill_(~mask.unsqueeze(1), torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(weights, value)  # (rows, kv_heads, groups x queries, value_dim)
    return out.reshape(rows, heads, queries, value.shape[-1])


def fits_matmul(query: torch.Tensor, key: torch.Tensor) -> bool:
    rows, heads, queries, _ = query.shape
    return rows * heads * queries * key.shape[2] <= MATMUL_SCORES_LIMIT


@dataclass(frozen=True)
class HeadShape:
    query_heads: int
    kv_heads: int
    key_dim: int
    value_dim: int


def fastest_seconds(fns: list[Callable[[], object]], runs: int = 7) -> list[float]:
    """Each function's fastest of `runs` timed calls, the calls interleaved (a burst of noise on a shared
    machine then falls on every candidate alike, and the minimum is the least disturbed figure: measured
    under two busy processes, the minimums still ranked the kernels as on a quiet machine, the medians
    did not)."""
    for fn in fns:  # warm: first calls allocate and pick oneDNN primitives
        fn()
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def _time_both(
    shape: HeadShape, rows: int, queries: int, keys: int, dtype: torch.dtype, device: torch.device
) -> tuple[float, float]:
    """(SDPA seconds, matmul seconds), each its fastest call, for one layer's attention at this shape, on
    random data laid out as the cache hands it over (views of slabs with spare columns)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    q = rand(rows, shape.query_heads, queries, shape.key_dim)
    k = rand(rows, shape.kv_heads, keys + 64, shape.key_dim)[:, :, :keys]
    v = rand(rows, shape.kv_heads, keys + 64, shape.value_dim)[:, :, :keys]
    mask = torch.ones(rows, 1, queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
    mask[0, :, :, keys // 2 :] = False  # unequal rows, as in a batch (every query still sees key 0)
    gqa = shape.query_heads != shape.kv_heads
    scale = shape.key_dim**-0.5

    def sdpa() -> object:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    with torch.inference_mode():
        sdpa_s, matmul_s = fastest_seconds([sdpa, lambda: matmul_attention(q, k, v, mask, scale)], runs=9)
    return sdpa_s, matmul_s


def choose(
    shape: HeadShape, dtype: torch.dtype, device: torch.device, requested: Kernel = Kernel.AUTO
) -> AttentionKernels:
    """The kernels a batched forward uses: `requested` for both phases, or (auto) the faster of the two
    on this machine, timed here at a decode shape (8 rows of 256 positions) and a prefill chunk (256)."""
    if requested != Kernel.AUTO:
        return AttentionKernels(requested, requested, "--attention-kernel")
    if device.type != "cpu" or dtype == torch.float32:
        return AttentionKernels(why="SDPA: float32 or not a CPU")
    picked, notes = [], []
    for phase, rows, queries in (("decode", 8, 1), ("prefill", 1, 256)):
        sdpa, matmul = _time_both(shape, rows, queries, 256, dtype, device)
        kernel = Kernel.MATMUL if matmul <= _FASTER_BY * sdpa else Kernel.SDPA
        picked.append(kernel)
        notes.append(f"{phase}: SDPA {sdpa * 1e3:.2f} ms, matmul {matmul * 1e3:.2f} ms a layer")
    return AttentionKernels(picked[0], picked[1], "timed at load: " + "; ".join(notes))
