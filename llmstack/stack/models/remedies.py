"""Download failures worded for people: what failed, then what to do about it."""

from __future__ import annotations

from pathlib import Path

from llmstack.stack.models.errors import DownloadError, DownloadFailure
from llmstack.stack.models.hub import Hub
from llmstack.stack.models.local import check_model_dir


def checked_download(hub: Hub, model: str, path: Path) -> Path:
    problem = check_model_dir(path)
    if problem:
        raise DownloadError(
            f"Downloaded {model} from {hub.name} into {path}, but it is not a usable model: "
            f"{problem}. Run the command again to resume, or check that the id names a model repo.",
            reason=DownloadFailure.INCOMPLETE,
            model=model,
            source=hub.source,
        )
    return path


def remedies(hub: Hub, model: str, revision: str | None) -> str:
    root, where = hub.cache_location(model, revision)
    return (
        "What to do:\n"
        f'  - use a local model directory instead: model = "/path/to/{model.rsplit("/", 1)[-1]}" '
        "(a folder with config.json and the weights);\n"
        f"  - pre-populate the cache: run `llmstack pull {model}` on a connected machine, then copy its cache "
        f"directory to {root} here (set {hub.cache_env} or cache_dir to use another place; the snapshot belongs "
        f"at {where});\n"
        f"  - use a reachable mirror: set {hub.mirror_env}, or pass endpoint=... / the config's endpoint;\n"
        "  - once the model is cached, run in offline mode (offline=True / --offline) so no hub is contacted."
    )


def unreachable_error(
    hub: Hub, model: str, revision: str | None, endpoints: tuple[str, ...], why: str
) -> DownloadError:
    return DownloadError(
        f"Cannot reach the {hub.name} hub ({', '.join(endpoints)}), and {model} is not in the local cache, so it "
        f"cannot be downloaded.\nCause: {why}\n{remedies(hub, model, revision)}",
        reason=DownloadFailure.UNREACHABLE,
        model=model,
        source=hub.source,
    )


def not_cached_error(hub: Hub, model: str, revision: str | None, cached_problem: str | None) -> DownloadError:
    state = f"is cached but unusable ({cached_problem})" if cached_problem else "is not in the local cache"
    rev = f" at revision {revision}" if revision else ""
    return DownloadError(
        f"Offline mode is on and {hub.name} model {model}{rev} {state}.\n"
        f"{remedies(hub, model, revision)}\n"
        "  - or turn offline mode off on a machine that can reach the hub.",
        reason=DownloadFailure.NOT_CACHED if cached_problem is None else DownloadFailure.INCOMPLETE,
        model=model,
        source=hub.source,
    )


def not_found_error(
    hub: Hub, model: str, revision: str | None, endpoints: tuple[str, ...], detail: str
) -> DownloadError:
    rev = f"revision {revision!r} of " if revision else ""
    other = "huggingface" if hub.source == "modelscope" else "modelscope"
    return DownloadError(
        f"{hub.name} ({', '.join(endpoints)}) has no {rev}model {model!r}: {detail}\n"
        "Check the id's spelling and case (e.g. 'Qwen/Qwen2.5-0.5B-Instruct') and the revision (a branch, "
        f"tag or commit; leave it unset for the default branch), or choose the other source "
        f"({other}) if the model lives there.",
        reason=DownloadFailure.NOT_FOUND,
        model=model,
        source=hub.source,
    )


def access_denied_error(hub: Hub, model: str, detail: str) -> DownloadError:
    return DownloadError(
        f"{hub.name} refused access to {model!r} (gated or private): {detail}\n"
        f"Accept the model's licence on the hub website and set {hub.token_env} to a token of that account.",
        reason=DownloadFailure.ACCESS_DENIED,
        model=model,
        source=hub.source,
    )


def invalid_id_error(hub: Hub, model: str, detail: str) -> DownloadError:
    return DownloadError(
        f"{model!r} is not a {detail}. Use '<owner>/<name>' such as 'Qwen/Qwen2.5-0.5B-Instruct', or a local "
        "path starting with '/', './' or '~'.",
        reason=DownloadFailure.INVALID_ID,
        model=model,
        source=hub.source,
    )


def failed_error(hub: Hub, model: str, exc: Exception) -> DownloadError:
    return DownloadError(
        f"Downloading {model} from {hub.name} failed: {type(exc).__name__}: {exc}",
        reason=DownloadFailure.FAILED,
        model=model,
        source=hub.source,
    )
