"""What this machine's CPU computes fast, for the dtype both engines pick when `--dtype` is left at auto.

Without bfloat16 matrix instructions (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension) torch and
vLLM emulate bfloat16 matmuls, hundreds of times slower than float32 ones (measured on an AVX2 host:
0.3 vs 167 GFLOP/s); with them, bfloat16 is the faster one and halves the bytes every decode step reads
(measured on an AMX host: 447 vs 27-130 GFLOP/s).  So on a CPU, auto means bfloat16 only where it is fast.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger("llmstack.engine")

_FAST_BF16 = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "Arm BF16"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 `flags`, Arm `Features`); empty where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def fast_bf16_units(flags: set[str]) -> list[str]:
    """The bfloat16 matrix instructions among `flags` (empty: bfloat16 would be emulated)."""
    return [name for flag, name in _FAST_BF16.items() if flag in flags]


def auto_cpu_dtype(flags: set[str]) -> tuple[str, str]:
    """(dtype, why) for a model on a CPU with these flags when the dtype is left at auto."""
    units = fast_bf16_units(flags)
    if units:
        return "bfloat16", f"the CPU has {' and '.join(units)}"
    return "float32", "the CPU has no AVX512-BF16/AMX-BF16: bfloat16 would be emulated, far slower than float32"


@functools.cache
def this_cpu_dtype() -> str:
    """`auto_cpu_dtype` for this machine, logged once."""
    dtype, why = auto_cpu_dtype(cpu_flags())
    log.info("dtype auto on this CPU: %s (%s); --dtype overrides it", dtype, why)
    return dtype
