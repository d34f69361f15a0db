"""Durations ("90s", "10m", "1h30m") and sizes ("12GiB", "500MB") as stack.toml writes them, parsed once.

Both also accept a plain number (seconds, bytes). They are pydantic types, so a bad value is reported
with the key that holds it, like every other config error."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|K|M|G|T)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
}  # fmt: skip


def parse_duration(value: Any) -> float:
    """Seconds from "1h30m", "10m", "2.5s", "250ms" or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as '90s', '10m' or '1h'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a duration such as '90s', '10m' or '1h'")
    text = value.strip().replace(" ", "")
    parts = list(_DURATION.finditer(text))
    if not parts or "".join(p.group(0) for p in parts) != text:
        raise ValueError(f"{value!r} is not a duration; write e.g. '90s', '10m', '1h30m' or '250ms'")
    return sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)


def parse_size(value: Any) -> int:
    """Bytes from "12GiB", "500MB", "1.5G" (binary), or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size such as '12GiB' or '500MB'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return int(value)
    if not isinstance(value, str):
        raise ValueError("a size such as '12GiB' or '500MB'")
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size; write e.g. '12GiB', '512MiB' or '8GB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_size(n: float | None) -> str:
    """Bytes for people: '1.5 GiB', '320 MiB'."""
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
