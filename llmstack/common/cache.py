"""llmstack's own cache directory (converted GGUF checkpoints, models assembled from Python packages);
the hub libraries keep their own caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$LLMSTACK_CACHE`, else `~/.cache/llmstack`."""
    env = os.environ.get("LLMSTACK_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmstack"
