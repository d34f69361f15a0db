"""Engines: one small async interface (`base.Engine`), one module per backend.

`create_engine` turns the worker's options into an engine; backends are imported only when chosen
(vLLM and torch are heavy, and vLLM is an optional extra).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from llmstack.services.engines.base import Engine

Backend = Literal["transformers", "vllm"]
BACKENDS: tuple[str, ...] = ("transformers", "vllm")


# libgomp, the OpenMP runtime of torch's CPU builds, lets a thread that waits at a barrier spin about
# 300,000 times before it sleeps.  A worker's generation thread shares the cores with its event loop
# (which streams the tokens), the API server and the clients: a spinning OpenMP thread takes a core
# from them, and one descheduled in the middle of a parallel region leaves its partners spinning until
# it runs again.  Measured with the benchmark model on 2 busy cores: 16 concurrent requests 46-78 tok/s
# with the default spin, 226-343 tok/s with 20,000; 1-token latency unchanged.
OPENMP_SPIN_COUNT = "20000"


def tune_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """A shorter OpenMP spin for the transformers engine; call before torch is imported.  An
    OMP_WAIT_POLICY or GOMP_SPINCOUNT of the user's own wins."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


class EngineOptionError(ValueError):
    """Options that cannot work together, or that the chosen backend does not have."""


@dataclass
class EngineOptions:
    """What `llmstack worker` (or a stack.toml `[[models]]` entry) asks of an engine."""

    backend: Backend
    model_path: str
    model_names: list[str]
    revision: str | None = None
    device: str = "auto"
    num_gpus: int = 1
    dtype: str = "auto"
    conv_template: str | None = None
    trust_remote_code: bool = False
    stream_interval: int = 1
    max_batch_size: int = 32  # transformers' continuous batching (vLLM: --max-num-seqs)
    max_batch_tokens: int = 16384
    prefix_caching: bool = True  # both backends (vLLM: enable_prefix_caching, left at its default when on)
    seed: int | None = None
    embed_in_truncate: bool = False
    # transformers only: those left at their default are absent
    transformers: dict[str, Any] = field(default_factory=dict)
    # vLLM only: engine arguments from flags that were given (by argument name), then --engine-args
    vllm: dict[str, Any] = field(default_factory=dict)
    engine_args: dict[str, Any] = field(default_factory=dict)
    extra_flags: dict[str, Any] = field(default_factory=dict)  # unlisted `--flag value` pairs (vLLM only)


_VLLM_INSTEAD = {
    "max_gpu_memory": "--gpu-memory-utilization",
    "load_8bit": "--quantization (e.g. bitsandbytes, awq, gptq, fp8)",
    "cpu_offloading": "--engine-args '{\"cpu_offload_gb\": N}'",
    "gptq": "--quantization gptq with a GPTQ checkpoint as --model-path",
    "awq": "--quantization awq with an AWQ checkpoint as --model-path",
}


def create_engine(opts: EngineOptions) -> Engine:
    """The engine for `opts.backend`; raises `EngineOptionError` with a message for people."""
    if opts.backend == "transformers":
        return _transformers(opts)
    if opts.backend == "vllm":
        return _vllm(opts)
    raise EngineOptionError(f"--backend must be one of {', '.join(BACKENDS)}, not {opts.backend!r}")


def _transformers(opts: EngineOptions) -> Engine:
    given = sorted({*opts.vllm, *opts.engine_args, *opts.extra_flags})
    if given:
        raise EngineOptionError(f"vLLM engine arguments ({', '.join(given)}) need --backend vllm")
    from llmstack.services.engines.hf.engine import HFEngine
    from llmstack.services.engines.hf.loading import HFEngineConfig

    hf = dict(opts.transformers)
    return HFEngine(
        HFEngineConfig(
            model_path=opts.model_path,
            model_names=opts.model_names,
            revision=opts.revision,
            device=opts.device,
            num_gpus=opts.num_gpus,
            dtype=opts.dtype,
            conv_template=opts.conv_template,
            trust_remote_code=opts.trust_remote_code,
            stream_interval=opts.stream_interval,
            max_batch_size=opts.max_batch_size,
            max_batch_tokens=opts.max_batch_tokens,
            prefix_caching=opts.prefix_caching,
            seed=opts.seed,
            embed_in_truncate=opts.embed_in_truncate,
            max_gpu_memory=hf.pop("max_gpu_memory", None),
            load_8bit=hf.pop("load_8bit", False),
            cpu_offloading=hf.pop("cpu_offloading", False),
            gptq=hf.pop("gptq", {}),
            awq=hf.pop("awq", {}),
        )
    )


def vllm_engine_args(opts: EngineOptions) -> dict[str, Any]:
    """Every engine argument vLLM gets, by name: shared flags, vLLM flags, extra flags, then
    `--engine-args` (which wins, so stack.toml's engine_args table overrides flag defaults)."""
    args: dict[str, Any] = {
        "tensor_parallel_size": opts.num_gpus,
        "dtype": opts.dtype,
        "trust_remote_code": opts.trust_remote_code,
    }
    if opts.revision:
        args["revision"] = opts.revision
    if opts.seed is not None:
        args["seed"] = opts.seed
    if opts.stream_interval > 1:
        args["stream_interval"] = opts.stream_interval
    if not opts.prefix_caching:
        args["enable_prefix_caching"] = False
    args.update(opts.vllm)
    args.update(opts.extra_flags)
    args.update(opts.engine_args)
    return args


def _vllm(opts: EngineOptions) -> Engine:
    for name in opts.transformers:
        flag = "--" + name.replace("_", "-")
        raise EngineOptionError(f"{flag} is a transformers option; with --backend vllm use {_VLLM_INSTEAD[name]}")
    from llmstack.services.engines.vllm.args import VLLMEngineConfig, VLLMUnavailable
    from llmstack.services.engines.vllm.engine import VLLMEngine

    cfg = VLLMEngineConfig(
        model_path=opts.model_path,
        model_names=opts.model_names,
        conv_template=opts.conv_template,
        device=opts.device,
        embed_in_truncate=opts.embed_in_truncate,
        engine_args=vllm_engine_args(opts),
    )
    try:
        engine = VLLMEngine(cfg)
        engine.check_device()
    except VLLMUnavailable as exc:
        raise EngineOptionError(str(exc)) from None
    except ValueError as exc:
        raise EngineOptionError(str(exc)) from exc
    return engine
