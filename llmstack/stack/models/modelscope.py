"""The ModelScope adapter (modelscope 1.40, which delegates to modelscope-hub 0.5).

Cache layout (see ``modelscope_cache_path``)::

    <cache>/models/<owner>--<name>/snapshots/<revision>/<files>     # written by downloads; revision
                                                                   # defaults to "master" (a branch name)
    <cache>/models/<owner>/<name with "." -> "___">/<files>         # pre-1.38 layout, still read
    <cache>/hub/models/<owner>/<name with "." -> "___">/<files>     # pre-1.38 default cache, still read

``<cache>`` is ``cache_dir``, else ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope``. No marker files:
``local_files_only`` accepts any non-empty snapshot directory (``master``, then ``main``, then the only
snapshot present), which is why `local.check_model_dir` also looks for half-finished downloads.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from llmstack.stack.models.errors import DownloadError, DownloadFailure
from llmstack.stack.models.hub import Hub
from llmstack.stack.models.probe import normalize_url
from llmstack.stack.models.progress import modelscope_progress
from llmstack.stack.models.remedies import (
    access_denied_error,
    failed_error,
    invalid_id_error,
    not_found_error,
    unreachable_error,
)

log = logging.getLogger(__name__)

MODELSCOPE_DEFAULT_ENDPOINTS = ("https://modelscope.cn", "https://www.modelscope.ai")
# One download at a time per process: rich allows one live display, and sys.stderr is swapped.
_DOWNLOAD_LOCK = threading.Lock()


def modelscope_cache_root(cache_dir: Path | None = None) -> Path:
    """The root ModelScope (modelscope-hub) caches under: ``cache_dir``, ``$MODELSCOPE_CACHE``, or default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MODELSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelscope"


def modelscope_cache_path(model_id: str, cache_dir: Path | None = None, revision: str | None = None) -> Path:
    """Where ``modelscope.snapshot_download`` (1.40) puts ``model_id``'s files, so a cache can be staged.

    ``<cache>/models/<owner>--<name>/snapshots/<revision or "master">``; the name keeps its dots. Any
    non-empty directory there satisfies ``local_files_only=True``: no refs or marker files are needed.
    """
    owner, name = _split_id(model_id)
    root = modelscope_cache_root(cache_dir)
    return root / "models" / f"{owner}--{name}" / "snapshots" / (revision or "master")


def _split_id(model_id: str) -> tuple[str, str]:
    parts = model_id.strip().split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise invalid_id_error(ModelScopeHub(None), model_id, "ModelScope model id")
    return parts[0], parts[1]


class ModelScopeHub(Hub):
    source = "modelscope"
    name = "ModelScope"
    cache_env = "MODELSCOPE_CACHE"
    mirror_env = "MODELSCOPE_ENDPOINT (or MODELSCOPE_DOMAIN)"
    token_env = "MODELSCOPE_API_TOKEN"

    @property
    def root(self) -> Path:
        # modelscope-hub reads MODELSCOPE_CACHE once per process (get_default_config is cached), so the root
        # is resolved here, at call time, and passed: the cache we check and report is the one it uses.
        return modelscope_cache_root(self.cache_dir)

    def check_id(self, model: str) -> None:
        _split_id(model)

    def endpoints(self, endpoint: str | None) -> tuple[str, ...]:
        if endpoint:
            return (normalize_url(endpoint),)
        for var in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
            if value := os.environ.get(var, "").strip():
                return (normalize_url(value),)
        return MODELSCOPE_DEFAULT_ENDPOINTS

    def cached(
        self, model: str, revision: str | None, endpoints: tuple[str, ...], allow_patterns: Sequence[str] | None
    ) -> Path | None:
        from modelscope import snapshot_download  # slow import (~1 s): only when a hub model is asked for

        try:
            return Path(
                snapshot_download(
                    model,
                    revision=revision,
                    cache_dir=self.root,
                    local_files_only=True,
                    allow_patterns=_patterns(allow_patterns),
                )
            )
        except Exception as exc:  # CacheNotFound, or an unusable cache entry
            log.debug("ModelScope cache miss for %s: %s", model, exc)
            return None

    def download(
        self,
        model: str,
        revision: str | None,
        endpoints: tuple[str, ...],
        progress: bool,
        allow_patterns: Sequence[str] | None,
    ) -> Path:
        from modelscope import snapshot_download

        # Like MODELSCOPE_CACHE, MODELSCOPE_ENDPOINT/DOMAIN are read once per process by modelscope-hub: pass
        # the endpoint we probed. With none configured, leave it to modelscope's own .cn -> .ai resolution.
        endpoint = endpoints[0] if endpoints != MODELSCOPE_DEFAULT_ENDPOINTS else None
        try:
            with _DOWNLOAD_LOCK, modelscope_progress(model, enabled=progress) as callbacks:
                return Path(
                    snapshot_download(
                        model,
                        revision=revision,
                        cache_dir=self.root,
                        endpoint=endpoint,
                        progress_callbacks=callbacks,
                        allow_patterns=_patterns(allow_patterns),
                    )
                )
        except DownloadError:
            raise
        except Exception as exc:
            raise self._error(model, revision, endpoints, exc) from exc

    def list_files(self, model: str, revision: str | None, endpoints: tuple[str, ...]) -> list[str]:
        from modelscope.hub.api import HubApi

        endpoint = endpoints[0] if endpoints != MODELSCOPE_DEFAULT_ENDPOINTS else None
        try:
            files = HubApi(endpoint=endpoint).get_model_files(model, revision=revision, recursive=True)
        except Exception as exc:
            raise self._error(model, revision, endpoints, exc) from exc
        return [str(f["Path"]) for f in files if f.get("Path")]

    def cache_location(self, model: str, revision: str | None) -> tuple[Path, Path]:
        return self.root, modelscope_cache_path(model, self.root, revision)

    def _error(self, model: str, revision: str | None, endpoints: tuple[str, ...], exc: Exception) -> DownloadError:
        """Translate modelscope / modelscope-hub / requests errors into one DownloadError."""
        status = _status_code(exc)
        names = {cls.__name__ for cls in type(exc).__mro__}
        text = str(exc)
        if status in (401, 403) or names & {"AuthenticationError", "PermissionDeniedError"}:
            return access_denied_error(self, model, text)
        if status == 404 or "NotExistError" in names:
            return not_found_error(self, model, revision, endpoints, text)
        if names & {"NetworkError", "ConnectionError", "Timeout", "RequestTimeoutError"}:
            return unreachable_error(self, model, revision, endpoints, text)
        if re.search(r"\bnot (found|exist)", text, re.IGNORECASE):
            return not_found_error(self, model, revision, endpoints, text)
        if "FileDownloadError" in names:
            return DownloadError(
                f"Downloading {model} from ModelScope stopped part-way: {text}. Files already fetched are kept; "
                "run the same command again to fetch only the rest.",
                reason=DownloadFailure.INCOMPLETE,
                model=model,
                source="modelscope",
            )
        return failed_error(self, model, exc)


def _patterns(allow_patterns: Sequence[str] | None) -> list[str] | None:
    return list(allow_patterns) if allow_patterns else None


def _status_code(exc: BaseException) -> int | None:
    for candidate in (exc, getattr(exc, "__cause__", None)):
        if candidate is None:
            continue
        status = getattr(candidate, "status_code", None)
        response = getattr(candidate, "response", None)
        if status is None and response is not None:
            status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None
