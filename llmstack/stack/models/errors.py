"""Why a model could not be made available locally: one error type whose `reason` callers branch on."""

from __future__ import annotations

import enum


class DownloadFailure(enum.StrEnum):
    """Why a model could not be resolved; callers (CLI exit codes, supervisor) branch on this."""

    LOCAL_PATH = "local_path"  # a local path that is missing or is not a model directory
    INVALID_ID = "invalid_id"  # malformed model id
    UNREACHABLE = "unreachable"  # the hub cannot be reached and the model is not cached
    NOT_CACHED = "not_cached"  # offline mode and the model is not cached
    NOT_FOUND = "not_found"  # the hub answered: no such model or revision
    ACCESS_DENIED = "access_denied"  # gated or private model, no/insufficient token
    INCOMPLETE = "incomplete"  # a cached or downloaded snapshot is missing files
    FAILED = "failed"  # anything else the hub library raised
    NOT_INSTALLED = "not_installed"  # a pypi: model whose package is missing (stack/packaged.py)


class DownloadError(Exception):
    """A model could not be made available locally; the message says what failed and what to do."""

    def __init__(self, message: str, *, reason: DownloadFailure, model: str, source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.model = model
        self.source = source
