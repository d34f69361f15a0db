"""Resolve a model name to a local directory: a local path, or a ModelScope / Hugging Face snapshot.

Order of work, and why:

1. A local path is used as is (after checking it looks like a model), so air-gapped boxes never touch a hub.
2. The hub cache is read with ``local_files_only=True`` first, so a model that is already cached starts
   with no network at all (ModelScope would otherwise list the repo on every start).
3. Only then, unless ``offline``, a short TCP probe of the hub host: ModelScope 1.40 retries an
   unreachable hub for ~22 s before it fails, and a stack that waits that long to say "no network" looks
   hung. The probe fails in milliseconds on a DNS error and in at most ``PROBE_TIMEOUT_S`` otherwise.
4. Then the real ``snapshot_download``, with a rich progress display for ModelScope.

Every failure is a ``DownloadError`` whose ``reason`` says what kind of failure it was and whose message
says what to do about it.

ModelScope cache layout (modelscope 1.40 delegates to modelscope-hub 0.5; see ``modelscope_cache_path``)::

    <cache>/models/<owner>--<name>/snapshots/<revision>/<files>     # written by downloads; revision
                                                                   # defaults to "master" (a branch name)
    <cache>/models/<owner>/<name with "." -> "___">/<files>         # pre-1.38 layout, still read
    <cache>/hub/models/<owner>/<name with "." -> "___">/<files>     # pre-1.38 default cache, still read

``<cache>`` is ``cache_dir``, else ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope``. No marker files:
``local_files_only`` accepts any non-empty snapshot directory (``master``, then ``main``, then the only
snapshot present), which is why ``_check_model_dir`` also looks for half-finished downloads.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from llmstack.services.engines.gguf.files import is_gguf_path
from llmstack.services.engines.gguf.header import GGUFError, is_gguf_file, read_header
from llmstack.stack.packaged import PackagedModelError, is_packaged, resolve_packaged

__all__ = [
    "DownloadError",
    "DownloadFailure",
    "PROBE_TIMEOUT_S",
    "Source",
    "hub_endpoints",
    "modelscope_cache_path",
    "modelscope_cache_root",
    "probe_hub",
    "resolve_model",
]

log = logging.getLogger(__name__)

Source = Literal["modelscope", "huggingface"]

#: Seconds the connectivity probe waits per host (DNS included) before calling a hub unreachable.
PROBE_TIMEOUT_S = 3.0

MODELSCOPE_DEFAULT_ENDPOINTS = ("https://modelscope.cn", "https://www.modelscope.ai")
HF_DEFAULT_ENDPOINT = "https://huggingface.co"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_MARKER_FILES = ("config.json", "adapter_config.json", "model_index.json")
_PART_FILE = re.compile(r"\.\w+_\d+_\d+$")  # modelscope-hub's ranged-download parts: <file>_<start>_<end>
_HUB_NAMES = {"modelscope": "ModelScope", "huggingface": "Hugging Face"}
_DOWNLOAD_LOCK = threading.Lock()


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


# --------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------
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
) -> Path:
    """Return a local directory holding ``model``, downloading it only when it is not cached.

    ``model`` is a local directory (absolute, ``./``, ``../``, ``~`` or any existing directory) or a hub id
    such as ``Qwen/Qwen2.5-0.5B-Instruct``. ``offline`` never touches the network. ``refresh`` skips the
    cache-first lookup (for ``llmstack pull``: the hub libraries re-check the snapshot and fetch only what
    is missing or changed). ``endpoint`` overrides the hub URL (a mirror).
    ``pypi:<distribution>`` is a model shipped in an installed Python package (see `packaged`).
    """
    if is_packaged(model):
        try:
            return resolve_packaged(model)
        except PackagedModelError as exc:
            raise DownloadError(str(exc), reason=DownloadFailure.NOT_INSTALLED, model=model) from exc
    if _looks_local(model):
        return _resolve_local(model)
    if source not in _HUB_NAMES:
        raise ValueError(f"unknown model source {source!r}; expected 'modelscope' or 'huggingface'")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    if source == "modelscope":
        return _resolve_modelscope(model, revision, cache, offline, endpoint, progress, refresh)
    return _resolve_huggingface(model, revision, cache, offline, endpoint, progress, refresh)


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
    owner, name = _split_modelscope_id(model_id)
    root = modelscope_cache_root(cache_dir)
    return root / "models" / f"{owner}--{name}" / "snapshots" / (revision or "master")


def hub_endpoints(source: Source, endpoint: str | None = None) -> tuple[str, ...]:
    """The hub URLs the download will use, with the same precedence as the hub libraries themselves."""
    if endpoint:
        return (_normalize_url(endpoint),)
    if source == "modelscope":
        for var in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
            if value := os.environ.get(var, "").strip():
                return (_normalize_url(value),)
        return MODELSCOPE_DEFAULT_ENDPOINTS
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return (_normalize_url(value or HF_DEFAULT_ENDPOINT),)


def probe_hub(endpoints: tuple[str, ...], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Return None if any endpoint accepts a TCP connection within ``timeout``, else why none did.

    DNS runs inside the timed thread, because ``getaddrinfo`` has no timeout of its own. When an HTTP(S)
    proxy is configured for a host, the proxy is probed instead, since that is what the download will use.
    """
    results: dict[str, str | None] = {}
    threads = []
    for url in endpoints:
        thread = threading.Thread(target=_probe_one, args=(url, timeout, results), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout + 0.5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(url in results and results[url] is None for url in endpoints):
        return None
    return "; ".join(f"{url}: {results.get(url) or f'no answer within {timeout:g} s'}" for url in endpoints)


# --------------------------------------------------------------------------------------------------------
# Local paths
# --------------------------------------------------------------------------------------------------------
def _looks_local(model: str) -> bool:
    if model.startswith(("/", "./", "../", "~")) or model in (".", "..") or is_gguf_path(model):
        return True
    return Path(model).is_dir()


def _resolve_local(model: str) -> Path:
    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise DownloadError(
            f"Local model path {path} does not exist. Check the path, or use a hub id such as "
            "'Qwen/Qwen2.5-0.5B-Instruct' to download it.",
            reason=DownloadFailure.LOCAL_PATH,
            model=model,
        )
    if not path.is_dir():
        if is_gguf_path(path) or is_gguf_file(path):  # a GGUF model is one file
            try:
                read_header(path)
            except GGUFError as exc:
                raise DownloadError(str(exc), reason=DownloadFailure.LOCAL_PATH, model=model) from exc
            return path
        raise DownloadError(
            f"Local model path {path} is a file but not a GGUF model file; point it at the model's directory "
            "(the folder holding config.json and the weights) or at a .gguf file.",
            reason=DownloadFailure.LOCAL_PATH,
            model=model,
        )
    problem = _check_model_dir(path)
    if problem:
        raise DownloadError(
            f"Local model path {path} does not look like a model: {problem}.",
            reason=DownloadFailure.LOCAL_PATH,
            model=model,
        )
    return path


def _check_model_dir(path: Path) -> str | None:
    """Return why ``path`` is not a usable model directory, or None when it is."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as exc:
        return f"cannot list it ({exc})"
    partial = sorted(n for n in names if n.endswith(".incomplete") or _PART_FILE.search(n))
    if partial:
        return f"a download was interrupted ({', '.join(partial[:3])} left behind)"
    if not any(m in names for m in _MARKER_FILES) and not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        return "no config.json and no weight files (*.safetensors, *.bin, *.gguf) in it"
    for index in sorted(n for n in names if n.endswith(".index.json")):
        shards = _index_shards(path / index)
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            return f"{index} lists weight shards that are missing: {', '.join(missing[:3])}"
    return None


def _index_shards(index: Path) -> set[str]:
    import json

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(v) for v in weight_map.values()} if isinstance(weight_map, dict) else set()


# --------------------------------------------------------------------------------------------------------
# ModelScope
# --------------------------------------------------------------------------------------------------------
def _split_modelscope_id(model_id: str) -> tuple[str, str]:
    parts = model_id.strip().split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise DownloadError(
            f"{model_id!r} is not a ModelScope model id: use '<owner>/<name>' such as "
            "'Qwen/Qwen2.5-0.5B-Instruct', or a local path starting with '/', './' or '~'.",
            reason=DownloadFailure.INVALID_ID,
            model=model_id,
            source="modelscope",
        )
    return parts[0], parts[1]


def _resolve_modelscope(
    model: str,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
    progress: bool,
    refresh: bool,
) -> Path:
    _split_modelscope_id(model)
    from modelscope import snapshot_download  # slow import (~1 s): only when a hub model is asked for

    # modelscope-hub reads MODELSCOPE_CACHE once per process (get_default_config is cached), so resolve the
    # root here, at call time, and pass it: the cache we check and report is the one modelscope uses.
    cache_dir = modelscope_cache_root(cache_dir)

    cached_problem: str | None = None
    if not refresh or offline:
        try:
            path = Path(snapshot_download(model, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except Exception as exc:  # CacheNotFound, or an unusable cache entry
            log.debug("ModelScope cache miss for %s: %s", model, exc)
        else:
            cached_problem = _check_model_dir(path)
            if cached_problem is None:
                log.info("Using cached ModelScope snapshot %s", path)
                return path
    if offline:
        raise _not_cached_error("modelscope", model, revision, cache_dir, cached_problem)

    endpoints = hub_endpoints("modelscope", endpoint)
    why = probe_hub(endpoints)
    if why is not None:
        raise _unreachable_error("modelscope", model, revision, cache_dir, endpoints, why)
    # Like MODELSCOPE_CACHE, MODELSCOPE_ENDPOINT/DOMAIN are read once per process by modelscope-hub: pass
    # the endpoint we probed. With none configured, leave it to modelscope's own .cn -> .ai resolution.
    if endpoints != MODELSCOPE_DEFAULT_ENDPOINTS:
        endpoint = endpoints[0]

    try:
        # One download at a time per process: rich allows one live display, and sys.stderr is swapped.
        with _DOWNLOAD_LOCK, _modelscope_progress(model, enabled=progress) as callbacks:
            path = Path(
                snapshot_download(
                    model,
                    revision=revision,
                    cache_dir=cache_dir,
                    endpoint=endpoint,
                    progress_callbacks=callbacks,
                )
            )
    except DownloadError:
        raise
    except Exception as exc:
        raise _modelscope_error(model, revision, cache_dir, endpoints, exc) from exc
    return _checked_download(path, "modelscope", model)


def _modelscope_error(
    model: str, revision: str | None, cache_dir: Path | None, endpoints: tuple[str, ...], exc: Exception
) -> DownloadError:
    """Translate modelscope / modelscope-hub / requests errors into one DownloadError."""
    status = _status_code(exc)
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc)
    if status in (401, 403) or names & {"AuthenticationError", "PermissionDeniedError"}:
        return _access_denied_error("modelscope", model, text)
    if status == 404 or "NotExistError" in names:
        return _not_found_error("modelscope", model, revision, endpoints, text)
    if names & {"NetworkError", "ConnectionError", "Timeout", "RequestTimeoutError"}:
        return _unreachable_error("modelscope", model, revision, cache_dir, endpoints, text)
    if re.search(r"\bnot (found|exist)", text, re.IGNORECASE):
        return _not_found_error("modelscope", model, revision, endpoints, text)
    if "FileDownloadError" in names:
        return DownloadError(
            f"Downloading {model} from ModelScope stopped part-way: {text}. Files already fetched are kept; "
            "run the same command again to fetch only the rest.",
            reason=DownloadFailure.INCOMPLETE,
            model=model,
            source="modelscope",
        )
    return DownloadError(
        f"Downloading {model} from ModelScope failed: {type(exc).__name__}: {text}",
        reason=DownloadFailure.FAILED,
        model=model,
        source="modelscope",
    )


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


# --------------------------------------------------------------------------------------------------------
# ModelScope progress: per-file byte bars in rich, fed by modelscope-hub's progress_callbacks
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _modelscope_progress(model: str, *, enabled: bool) -> Iterator[list[Any] | None]:
    """Yield ``progress_callbacks`` for ``snapshot_download`` that drive a rich display on stderr.

    modelscope-hub reports bytes only through ``progress_callbacks`` (large files are fetched in parallel
    ranges with no bar of their own), but also draws its own tqdm bars for the file count and small files.
    Two live displays on one terminal garble each other, so while ours runs tqdm's carriage-return
    redraws are dropped; any other stderr text still reaches the terminal above the bars.
    """
    if not enabled:  # no display at all: also keep modelscope-hub's tqdm bars out of service logs
        with _drop_tqdm_redraws():
            yield None
        return
    from modelscope.hub.callback import ProgressCallback
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    display = Progress(
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    label = escape(model)
    overall = display.add_task(f"{label} (0 files)", total=None)
    counts = {"files": 0, "bytes": 0}
    lock = threading.Lock()

    class RichCallback(ProgressCallback):  # type: ignore[misc]
        """One instance per file, created by modelscope-hub in its download threads."""

        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            total = file_size if file_size and file_size > 0 else None
            self.task = display.add_task(f"  {escape(Path(filename).name)}", total=total)
            with lock:  # the grand total grows as files start: the listing's sizes are not exposed
                counts["bytes"] += max(file_size or 0, 0)
                display.update(overall, total=counts["bytes"])
            self.ended = False

        def update(self, size: int) -> None:
            display.advance(self.task, size)
            display.advance(overall, size)

        def end(self) -> None:
            if self.ended:
                return
            self.ended = True
            display.remove_task(self.task)
            with lock:
                counts["files"] += 1
                display.update(overall, description=f"{label} ({counts['files']} files)")

    console.print(f"Downloading [bold]{escape(model)}[/] from ModelScope")
    with display, _drop_tqdm_redraws():
        yield [RichCallback]


class _TqdmFilter(io.TextIOBase):
    """A stderr stand-in that drops tqdm's redraws (``\\r`` lines, bare newlines, cursor moves)."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def __init__(self, target: Any) -> None:
        self._target = target

    def write(self, text: str) -> int:
        if "\r" not in text and self._ANSI.sub("", text).strip():
            self._target.write(text)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def fileno(self) -> int:  # lets tqdm measure the terminal width
        fileno = getattr(self._target, "fileno", None)
        if fileno is None:
            raise io.UnsupportedOperation("fileno")
        return int(fileno())

    def isatty(self) -> bool:
        return bool(getattr(self._target, "isatty", lambda: False)())


@contextlib.contextmanager
def _drop_tqdm_redraws() -> Iterator[None]:
    original = sys.stderr
    sys.stderr = _TqdmFilter(original)
    try:
        yield
    finally:
        sys.stderr = original


# --------------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------------
def _resolve_huggingface(
    model: str,
    revision: str | None,
    cache_dir: Path | None,
    offline: bool,
    endpoint: str | None,
    progress: bool,
    refresh: bool,
) -> Path:
    import huggingface_hub
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import errors as hf_errors

    offline = offline or bool(hf_constants.HF_HUB_OFFLINE)
    endpoints = hub_endpoints("huggingface", endpoint)
    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "endpoint": endpoints[0]}
    cached_problem: str | None = None
    if not refresh or offline:
        try:
            path = Path(huggingface_hub.snapshot_download(model, local_files_only=True, **kwargs))
        except hf_errors.HFValidationError as exc:
            raise _invalid_hf_id(model, exc) from exc
        except Exception as exc:  # LocalEntryNotFoundError and friends
            log.debug("Hugging Face cache miss for %s: %s", model, exc)
        else:
            cached_problem = _check_model_dir(path)
            if cached_problem is None:
                log.info("Using cached Hugging Face snapshot %s", path)
                return path
    if offline:
        raise _not_cached_error("huggingface", model, revision, cache_dir, cached_problem)

    why = probe_hub(endpoints)
    if why is not None:
        raise _unreachable_error("huggingface", model, revision, cache_dir, endpoints, why)

    if not progress:
        kwargs["tqdm_class"] = _silent_tqdm()
    try:
        path = Path(huggingface_hub.snapshot_download(model, **kwargs))
    except hf_errors.GatedRepoError as exc:
        raise _access_denied_error("huggingface", model, str(exc)) from exc
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as exc:
        raise _not_found_error("huggingface", model, revision, endpoints, str(exc)) from exc
    except hf_errors.HFValidationError as exc:
        raise _invalid_hf_id(model, exc) from exc
    except hf_errors.LocalEntryNotFoundError as exc:  # the hub vanished between probe and download
        raise _unreachable_error("huggingface", model, revision, cache_dir, endpoints, str(exc)) from exc
    except Exception as exc:
        raise DownloadError(
            f"Downloading {model} from Hugging Face failed: {type(exc).__name__}: {exc}",
            reason=DownloadFailure.FAILED,
            model=model,
            source="huggingface",
        ) from exc
    return _checked_download(path, "huggingface", model)


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def _invalid_hf_id(model: str, exc: Exception) -> DownloadError:
    return DownloadError(
        f"{model!r} is not a valid Hugging Face repo id ({exc}). Use '<owner>/<name>' such as "
        "'Qwen/Qwen2.5-0.5B-Instruct', or a local path starting with '/', './' or '~'.",
        reason=DownloadFailure.INVALID_ID,
        model=model,
        source="huggingface",
    )


def _hf_cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return cache_dir
    from huggingface_hub import constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------------------------------------
# Messages: what failed, then what to do
# --------------------------------------------------------------------------------------------------------
def _checked_download(path: Path, source: str, model: str) -> Path:
    problem = _check_model_dir(path)
    if problem:
        raise DownloadError(
            f"Downloaded {model} from {_HUB_NAMES[source]} into {path}, but it is not a usable model: "
            f"{problem}. Run the command again to resume, or check that the id names a model repo.",
            reason=DownloadFailure.INCOMPLETE,
            model=model,
            source=source,
        )
    return path


def _cache_location(source: str, model: str, revision: str | None, cache_dir: Path | None) -> tuple[Path, Path]:
    """(cache root, where this model's snapshot would be) for messages."""
    if source == "modelscope":
        return modelscope_cache_root(cache_dir), modelscope_cache_path(model, cache_dir, revision)
    root = _hf_cache_root(cache_dir)
    return root, root / f"models--{model.replace('/', '--')}" / "snapshots"


def _remedies(source: str, model: str, revision: str | None, cache_dir: Path | None) -> str:
    root, where = _cache_location(source, model, revision, cache_dir)
    if source == "modelscope":
        cache_env, mirror_env = "MODELSCOPE_CACHE", "MODELSCOPE_ENDPOINT (or MODELSCOPE_DOMAIN)"
    else:
        cache_env, mirror_env = "HF_HUB_CACHE (or HF_HOME)", "HF_ENDPOINT"
    return (
        "What to do:\n"
        f'  - use a local model directory instead: model = "/path/to/{model.rsplit("/", 1)[-1]}" '
        "(a folder with config.json and the weights);\n"
        f"  - pre-populate the cache: run `llmstack pull {model}` on a connected machine, then copy its cache "
        f"directory to {root} here (set {cache_env} or cache_dir to use another place; the snapshot belongs "
        f"at {where});\n"
        f"  - use a reachable mirror: set {mirror_env}, or pass endpoint=... / the config's endpoint;\n"
        "  - once the model is cached, run in offline mode (offline=True / --offline) so no hub is contacted."
    )


def _unreachable_error(
    source: str, model: str, revision: str | None, cache_dir: Path | None, endpoints: tuple[str, ...], why: str
) -> DownloadError:
    hub = _HUB_NAMES[source]
    return DownloadError(
        f"Cannot reach the {hub} hub ({', '.join(endpoints)}), and {model} is not in the local cache, so it "
        f"cannot be downloaded.\nCause: {why}\n{_remedies(source, model, revision, cache_dir)}",
        reason=DownloadFailure.UNREACHABLE,
        model=model,
        source=source,
    )


def _not_cached_error(
    source: str, model: str, revision: str | None, cache_dir: Path | None, cached_problem: str | None
) -> DownloadError:
    hub = _HUB_NAMES[source]
    state = f"is cached but unusable ({cached_problem})" if cached_problem else "is not in the local cache"
    rev = f" at revision {revision}" if revision else ""
    return DownloadError(
        f"Offline mode is on and {hub} model {model}{rev} {state}.\n"
        f"{_remedies(source, model, revision, cache_dir)}\n"
        "  - or turn offline mode off on a machine that can reach the hub.",
        reason=DownloadFailure.NOT_CACHED if cached_problem is None else DownloadFailure.INCOMPLETE,
        model=model,
        source=source,
    )


def _not_found_error(
    source: str, model: str, revision: str | None, endpoints: tuple[str, ...], detail: str
) -> DownloadError:
    hub = _HUB_NAMES[source]
    rev = f"revision {revision!r} of " if revision else ""
    return DownloadError(
        f"{hub} ({', '.join(endpoints)}) has no {rev}model {model!r}: {detail}\n"
        "Check the id's spelling and case (e.g. 'Qwen/Qwen2.5-0.5B-Instruct') and the revision (a branch, "
        f"tag or commit; leave it unset for the default branch), or choose the other source "
        f"({'huggingface' if source == 'modelscope' else 'modelscope'}) if the model lives there.",
        reason=DownloadFailure.NOT_FOUND,
        model=model,
        source=source,
    )


def _access_denied_error(source: str, model: str, detail: str) -> DownloadError:
    hub = _HUB_NAMES[source]
    token_env = "MODELSCOPE_API_TOKEN" if source == "modelscope" else "HF_TOKEN"
    return DownloadError(
        f"{hub} refused access to {model!r} (gated or private): {detail}\n"
        f"Accept the model's licence on the hub website and set {token_env} to a token of that account.",
        reason=DownloadFailure.ACCESS_DENIED,
        model=model,
        source=source,
    )


# --------------------------------------------------------------------------------------------------------
# Connectivity probe internals
# --------------------------------------------------------------------------------------------------------
def _normalize_url(value: str) -> str:
    value = value.strip()
    if not value.lower().startswith(("http://", "https://")):
        value = f"https://{value}"
    return value.rstrip("/")


def _probe_target(url: str) -> tuple[str, int]:
    """The (host, port) a download from ``url`` will connect to first: the URL's host or its proxy."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.hostname:
            default = 443 if proxy_url.scheme == "https" else 1080 if proxy_url.scheme.startswith("socks") else 80
            return proxy_url.hostname, proxy_url.port or default
    return host, port


def _probe_one(url: str, timeout: float, results: dict[str, str | None]) -> None:
    host, port = _probe_target(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            results[url] = None
    except OSError as exc:
        results[url] = f"cannot connect to {host}:{port} ({exc})"
