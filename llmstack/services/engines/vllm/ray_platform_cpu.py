"""The CPU platform with a Ray device key (`ray_platform.py` says when and why); imported by vLLM only."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform


class RayCpuPlatform(CpuPlatform):
    # one Ray "GPU" per vLLM rank: Ray refuses "CPU" as a custom resource, and for "GPU" it hands each actor
    # its ids (get_accelerator_ids), which vLLM's Ray workers read
    ray_device_key: str = "GPU"
