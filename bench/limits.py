"""This machine's physical limits for decoding, and a model's decode ceilings derived from them.

- memory bandwidth: the best of several reads of a 1 GiB tensor (torch, all its threads);
- matrix throughput: the best of several square matmuls, per dtype (float32, bfloat16);
- a model's cost per decode step: the bytes of weights it reads (every matrix once; an input embedding
  is only looked up, unless the LM head shares it) and the FLOPs per generated token (2 per weight of
  every matrix it multiplies by, the LM head included).

Ceilings: at batch 1 a step reads all the weights for one token, so tokens/s <= bandwidth / weight bytes;
at a large batch the weights are read once for many tokens and the matmuls bound it, so tokens/s <=
matmul throughput / FLOPs per token.  (Attention over the KV cache adds to both; it is small at the
lengths measured here and is left out, so the ceilings are upper bounds.)
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MachineLimits:
    threads: int
    bandwidth_gbs: float  # memory read, GB/s
    matmul_gflops: dict[str, float]  # by dtype

    def as_dict(self) -> dict:
        return asdict(self)


def _best(fn, repeats: int) -> float:  # noqa: ANN001 - a timed callable
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def memory_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    seconds = _best(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds / 1e9


def matmul_throughput(dtype: torch.dtype, n: int = 2048, repeats: int = 5, budget_s: float = 0.5) -> float:
    """GFLOP/s of a square matmul: `n` wide, or narrower where one product would take over `budget_s`
    (bfloat16 without AVX-512-BF16/AMX is emulated at a few hundred MFLOP/s: 2048 wide takes a minute)."""
    probe = 256
    a = torch.randn(probe, probe).to(dtype)
    b = torch.randn(probe, probe).to(dtype)
    rate = 2 * probe**3 / _best(lambda: a @ b, 1)  # FLOP/s, roughly
    while n > probe and 2 * n**3 / rate > budget_s:
        n //= 2
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    seconds = _best(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def measure_machine(dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> MachineLimits:
    return MachineLimits(
        threads=torch.get_num_threads(),
        bandwidth_gbs=memory_bandwidth(),
        matmul_gflops={d: matmul_throughput(getattr(torch, d)) for d in dtypes},
    )


@dataclass
class ModelCost:
    parameters: int
    matrix_parameters: int  # weights multiplied per generated token (LM head included)
    read_parameters: int  # weights read per decode step

    def weight_bytes(self, dtype: str) -> int:
        return self.read_parameters * _DTYPE_BYTES[dtype]

    @property
    def flops_per_token(self) -> int:
        return 2 * self.matrix_parameters

    def ceilings(self, limits: MachineLimits, dtype: str) -> tuple[float, float]:
        """(batch-1 tokens/s, large-batch tokens/s) for this model in `dtype` on this machine."""
        batch1 = limits.bandwidth_gbs * 1e9 / self.weight_bytes(dtype)
        compute = limits.matmul_gflops[dtype] * 1e9 / self.flops_per_token
        return batch1, compute


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}


def model_cost(model_dir: Path) -> ModelCost:
    """From the checkpoint's tensor shapes (no weights are loaded) and its config."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(file))
    count = {name: int(torch.Size(shape).numel()) for name, shape in shapes.items()}
    total = sum(count.values())
    embedding = sum(n for name, n in count.items() if name.endswith("embed_tokens.weight"))
    head = sum(n for name, n in count.items() if name.endswith("lm_head.weight"))
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))) and not head
    if tied:  # the head multiplies by the embedding matrix: read once, used as a matrix
        return ModelCost(total, total, total)
    return ModelCost(total, total - embedding, total - embedding)
