"""What the cache-first algorithm (`resolve.py`) needs from a model hub: one adapter per hub library.

An adapter knows its hub's ids, cache, endpoints and error types; the order of work is not its business.
`allow_patterns` (glob patterns, as both hub libraries take them) limits a snapshot to some files, e.g. one
quantisation of a GGUF repository; None takes every file.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

Source = Literal["modelscope", "huggingface"]


class Hub(abc.ABC):
    source: Source
    name: str  # for people: "ModelScope"
    cache_env: str  # the variables that move its cache, point it at a mirror, carry a token (for messages)
    mirror_env: str
    token_env: str

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None

    def check_id(self, model: str) -> None:  # noqa: B027 - optional hook
        """Raise `DownloadError(INVALID_ID)` for an id this hub cannot have, before its library is imported."""

    def forced_offline(self) -> bool:
        """The hub library's own offline switch is on (e.g. HF_HUB_OFFLINE)."""
        return False

    @abc.abstractmethod
    def endpoints(self, endpoint: str | None) -> tuple[str, ...]:
        """The hub URLs a download will use, with the same precedence as the hub library itself."""

    @abc.abstractmethod
    def cached(
        self, model: str, revision: str | None, endpoints: tuple[str, ...], allow_patterns: Sequence[str] | None
    ) -> Path | None:
        """The cached snapshot, looked up without any network; None when there is none."""

    @abc.abstractmethod
    def download(
        self,
        model: str,
        revision: str | None,
        endpoints: tuple[str, ...],
        progress: bool,
        allow_patterns: Sequence[str] | None,
    ) -> Path:
        """Fetch what is missing into the cache; the library's errors become `DownloadError`s."""

    @abc.abstractmethod
    def list_files(self, model: str, revision: str | None, endpoints: tuple[str, ...]) -> list[str]:
        """The repository's file paths, asked of the hub (to pick one GGUF file before downloading it)."""

    @abc.abstractmethod
    def cache_location(self, model: str, revision: str | None) -> tuple[Path, Path]:
        """(cache root, where this model's snapshot belongs), for messages."""
