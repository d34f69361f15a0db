"""One model name to one local directory: a local path as it is, else a hub snapshot, cache first.

The order of work, the same for every hub (`hub.Hub` adapters: `modelscope.py`, `huggingface.py`), and why:

1. A local path is used as is (after checking it looks like a model), so air-gapped boxes never touch a hub.
2. The hub cache is read with ``local_files_only=True`` first, so a model that is already cached starts
   with no network at all (ModelScope would otherwise list the repo on every start).
3. Only then, unless ``offline``, a short TCP probe of the hub host: ModelScope 1.40 retries an
   unreachable hub for ~22 s before it fails, and a stack that waits that long to say "no network" looks
   hung. The probe fails in milliseconds on a DNS error and in at most ``PROBE_TIMEOUT_S`` otherwise.
4. Then the real ``snapshot_download``, with a rich progress display for ModelScope.

Every failure is a ``DownloadError`` whose ``reason`` says what kind of failure it was and whose message
says what to do about it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from llmstack.stack.models.errors import DownloadError, DownloadFailure
from llmstack.stack.models.gguf import resolve_gguf
from llmstack.stack.models.hub import Hub, Source
from llmstack.stack.models.huggingface import HuggingFaceHub
from llmstack.stack.models.local import check_model_dir, looks_local, resolve_local
from llmstack.stack.models.modelscope import ModelScopeHub
from llmstack.stack.models.probe import probe_hub
from llmstack.stack.models.remedies import checked_download, not_cached_error, unreachable_error
from llmstack.stack.packaged import PackagedModelError, is_packaged, resolve_packaged

log = logging.getLogger(__name__)

HUBS: dict[str, type[Hub]] = {"modelscope": ModelScopeHub, "huggingface": HuggingFaceHub}


def resolve_model(
    model: str,
    *,
    source: Source = "modelscope",
    revision: str | None = None,
    cache_dir: Path | None = None,
    offline: bool = False,
    endpoint: str | None = None,
    progress: bool = True,
    refresh: bool = False,
    allow_patterns: Sequence[str] | None = None,
    gguf_file: str | None = None,
) -> Path:
    """Return a local directory holding ``model``, downloading it only when it is not cached.

    ``model`` is a local directory (absolute, ``./``, ``../``, ``~`` or any existing directory) or a hub id
    such as ``Qwen/Qwen2.5-0.5B-Instruct``. ``offline`` never touches the network. ``refresh`` skips the
    cache-first lookup (for ``llmstack pull``: the hub libraries re-check the snapshot and fetch only what
    is missing or changed). ``endpoint`` overrides the hub URL (a mirror). ``allow_patterns`` limits the
    snapshot to the files matching these globs. ``gguf_file`` picks one .gguf file of the directory or
    repository (downloading that file alone) and returns its path; ``pypi:<distribution>`` is a model in an
    installed Python package (`stack/packaged.py`).
    """
    if is_packaged(model):
        try:
            return resolve_packaged(model)
        except PackagedModelError as exc:
            raise DownloadError(str(exc), reason=DownloadFailure.NOT_INSTALLED, model=model) from exc
    if gguf_file is not None:
        hub = None if looks_local(model) else _hub(source, cache_dir)
        return resolve_gguf(
            hub, model, gguf_file, revision=revision, offline=offline, endpoint=endpoint, progress=progress,
            refresh=refresh,
        )  # fmt: skip
    if looks_local(model):
        return resolve_local(model)
    hub = _hub(source, cache_dir)
    hub.check_id(model)
    offline = offline or hub.forced_offline()
    endpoints = hub.endpoints(endpoint)
    cached_problem: str | None = None
    if not refresh or offline:
        path = hub.cached(model, revision, endpoints, allow_patterns)
        if path is not None:
            cached_problem = check_model_dir(path)
            if cached_problem is None:
                log.info("Using cached %s snapshot %s", hub.name, path)
                return path
    if offline:
        raise not_cached_error(hub, model, revision, cached_problem)
    why = probe_hub(endpoints)
    if why is not None:
        raise unreachable_error(hub, model, revision, endpoints, why)
    return checked_download(hub, model, hub.download(model, revision, endpoints, progress, allow_patterns))


def _hub(source: str, cache_dir: Path | None) -> Hub:
    if source not in HUBS:
        raise ValueError(f"unknown model source {source!r}; expected 'modelscope' or 'huggingface'")
    return HUBS[source](cache_dir)


def hub_endpoints(source: Source, endpoint: str | None = None) -> tuple[str, ...]:
    """The hub URLs a download from ``source`` will use, with the same precedence as the hub library."""
    return HUBS[source](None).endpoints(endpoint)
