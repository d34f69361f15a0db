"""One GGUF file of a directory or hub repository (`gguf_file = "*q4_k_m.gguf"`), downloading that file alone.

GGUF repositories hold one file per quantisation, often a dozen of several GB each, so the pattern is
matched against the repository's file list first and only the one matching file is fetched (through the
hub library's allow_patterns, with its progress bar).  A cached snapshot that already holds a matching file
is used with no network at all; a pattern that matches none or several files is an error naming them.
"""

from __future__ import annotations

from pathlib import Path

from llmstack.services.engines.gguf.files import match_gguf, pick_gguf_file
from llmstack.services.engines.gguf.header import GGUFError
from llmstack.stack.models.errors import DownloadError, DownloadFailure
from llmstack.stack.models.hub import Hub
from llmstack.stack.models.local import looks_local, resolve_local
from llmstack.stack.models.probe import probe_hub
from llmstack.stack.models.remedies import unreachable_error

_MISSES = (DownloadFailure.NOT_CACHED, DownloadFailure.INCOMPLETE)


def resolve_gguf(
    hub: Hub | None,
    model: str,
    pattern: str,
    *,
    revision: str | None,
    offline: bool,
    endpoint: str | None,
    progress: bool,
    refresh: bool,
) -> Path:
    """The .gguf file `pattern` selects in `model` (a local directory, or a repo of `hub`)."""
    from llmstack.stack.models.resolve import resolve_model

    if hub is None or looks_local(model):
        return pick_gguf_file(resolve_local(model), pattern)
    offline = offline or hub.forced_offline()
    common = {"source": hub.source, "revision": revision, "cache_dir": hub.cache_dir, "endpoint": endpoint}
    if not refresh or offline:
        try:
            cached = resolve_model(model, offline=True, allow_patterns=[pattern], **common)
            return pick_gguf_file(cached, pattern)
        except DownloadError as exc:
            if offline or exc.reason not in _MISSES:
                raise
        except GGUFError as exc:
            if offline or "matches no file" not in str(exc):
                raise  # several matching files in the cache: the pattern must be narrowed, not re-downloaded
    endpoints = hub.endpoints(endpoint)
    why = probe_hub(endpoints)
    if why is not None:
        raise unreachable_error(hub, model, revision, endpoints, why)
    name = match_gguf(hub.list_files(model, revision, endpoints), pattern, f"{hub.name} repository {model}")
    snapshot = resolve_model(model, allow_patterns=[name], progress=progress, refresh=refresh, **common)
    path = snapshot / name
    if not path.is_file():
        raise DownloadError(
            f"Downloaded {model} from {hub.name} but {name} is not in {snapshot}; run the command again to resume.",
            reason=DownloadFailure.INCOMPLETE,
            model=model,
            source=hub.source,
        )
    return path
