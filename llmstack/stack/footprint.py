"""What a model will take in memory once its worker is up, estimated before loading it: the weights on
disk, scaled to the dtype the worker loads them in (or 8 bits), plus the process's own runtime. After
the load the supervisor replaces the estimate with the worker's measured resident memory; a `memory` key
in `[[models]]` overrides both (the operator knows best, e.g. for a KV cache reserved up front)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from llmstack.services.engines.gguf.files import is_gguf_path
from llmstack.stack.config import ModelSection

#: a worker process before any weights: Python, torch, transformers, the HTTP server (measured ~0.4 GiB)
RUNTIME_BYTES = 400 * 2**20
#: vLLM on a CPU reserves its KV cache up front (the worker's default when no memory setting is given)
VLLM_CPU_KV_BYTES = 2 * 2**30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


class Footprint(BaseModel):
    """An estimate in bytes: in host memory, and on each GPU the model uses (index -> bytes)."""

    host_bytes: int
    gpu_bytes: dict[str, int] = {}
    detail: str


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]


def _checkpoint_dtype(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("quantization_config"):
        return None  # a quantised checkpoint loads at its size on disk
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in _DTYPE_BYTES else None


def _load_dtype(m: ModelSection, stored: str) -> str:
    """The dtype the worker computes in: its `dtype`, else what `auto` picks (CPU: float32 unless the CPU has
    bfloat16 units; GPU: the checkpoint's own)."""
    if m.dtype != "auto":
        return m.dtype
    if m.device in ("cpu", "auto"):
        from llmstack.services.engines.hardware import this_cpu_dtype

        return this_cpu_dtype() if m.device == "cpu" else stored
    return stored


def _weights_in_memory(path: Path, m: ModelSection) -> tuple[int, str]:
    files = weight_files(path)
    on_disk = sum(f.stat().st_size for f in files)
    if not files:
        return 0, "no weight files found"
    if is_gguf_path(path):
        if m.backend == "vllm":
            return on_disk, f"GGUF file {on_disk / 2**20:.0f} MiB"
        from llmstack.services.engines.gguf.describe import describe_gguf

        params = describe_gguf(path, m.conv_template, m.backend).parameters
        width = _DTYPE_BYTES.get(_load_dtype(m, "float32"), 4)
        return params * width, f"GGUF {params / 1e6:.0f}M parameters dequantised to {width} bytes each"
    stored = _checkpoint_dtype(path)
    if stored is None:
        return on_disk, f"weights {on_disk / 2**20:.0f} MiB on disk"
    if m.load_8bit:
        return on_disk // _DTYPE_BYTES[stored], f"weights {on_disk / 2**20:.0f} MiB {stored} on disk, loaded 8-bit"
    loaded = _load_dtype(m, stored)
    scaled = on_disk * _DTYPE_BYTES.get(loaded, 4) // _DTYPE_BYTES[stored]
    return scaled, f"weights {on_disk / 2**20:.0f} MiB {stored} on disk, loaded as {loaded}"


def estimate(path: Path, m: ModelSection) -> Footprint:
    """The estimate for one `[[models]]` entry (one worker) whose weights are at `path`."""
    weights, detail = _weights_in_memory(Path(path), m)
    if m.device == "cuda":
        gpus = m.gpus.split(",") if m.gpus else [str(i) for i in range(m.num_gpus)]
        share = weights // max(len(gpus), 1)
        return Footprint(host_bytes=RUNTIME_BYTES, gpu_bytes=dict.fromkeys(gpus, share), detail=detail + ", on GPU")
    host = weights + RUNTIME_BYTES
    if m.backend == "vllm":
        host += VLLM_CPU_KV_BYTES
        detail += ", plus vLLM's KV cache"
    return Footprint(host_bytes=host, detail=detail + ", plus the runtime")
