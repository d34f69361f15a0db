"""An engine's configuration from the worker's options: `HFEngineConfig` for transformers (each option by
its name), `VLLMEngineConfig` for vLLM (the options that map onto a vLLM engine argument, then
`engine_args`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmstack.services.worker.options import OPTIONS, WorkerOptions

if TYPE_CHECKING:
    from llmstack.services.engines.hf.loading import HFEngineConfig
    from llmstack.services.engines.vllm.args import VLLMEngineConfig


def vllm_engine_args(opts: WorkerOptions) -> dict[str, Any]:
    """Every engine argument vLLM gets, by name: the options that map onto one (when not at their default),
    then `engine_args` (extra `--its-name VALUE` flags and the JSON/table), which wins."""
    args = {OPTIONS[name].vllm: getattr(opts, name) for name in opts.given() if OPTIONS[name].vllm}
    args.update(opts.engine_args)
    return args


#: Options that configure the worker process or its HTTP layer rather than the engine (gguf_file is
#: resolved by the worker into the .gguf model path the engine gets).
WORKER_LEVEL = frozenset(
    {"backend", "host", "port", "worker_address", "gpus", "limit_worker_concurrency", "max_queue", "tool_parser",
     "reasoning_parser", "heartbeat_interval", "gguf_file"}
)  # fmt: skip
_HF_GROUPS = ("gptq", "awq")  # HFEngineConfig takes these as dicts: gptq_wbits -> gptq["wbits"]


def hf_engine_config(opts: WorkerOptions) -> HFEngineConfig:
    """The transformers engine's configuration: every option of that backend (or both) by its name."""
    from llmstack.services.engines.hf.loading import HFEngineConfig

    values: dict[str, Any] = {"model_path": opts.model, "model_names": opts.served_names}
    values.update({g: {} for g in _HF_GROUPS})
    for name, opt in OPTIONS.items():
        if opt.backend == "vllm" or name in WORKER_LEVEL or name in ("model", "names"):
            continue
        group, _, key = name.partition("_")
        if group in _HF_GROUPS:
            values[group][key] = getattr(opts, name)
        else:  # a transformers option HFEngineConfig lacks fails here, loudly
            values[name] = getattr(opts, name)
    return HFEngineConfig(**values)


def vllm_engine_config(opts: WorkerOptions) -> VLLMEngineConfig:
    from llmstack.services.engines.vllm.args import VLLMEngineConfig

    return VLLMEngineConfig(
        model_path=opts.model,
        model_names=opts.served_names,
        conv_template=opts.conv_template,
        device=opts.device,
        embed_in_truncate=opts.embed_in_truncate,
        engine_args=vllm_engine_args(opts),
    )


def engine_config(opts: WorkerOptions) -> HFEngineConfig | VLLMEngineConfig:
    return hf_engine_config(opts) if opts.backend == "transformers" else vllm_engine_config(opts)
