"""The Hugging Face adapter (huggingface_hub): its cache, its offline switch, its error types."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmstack.stack.models.hub import Hub
from llmstack.stack.models.probe import normalize_url
from llmstack.stack.models.remedies import (
    access_denied_error,
    failed_error,
    invalid_id_error,
    not_found_error,
    unreachable_error,
)

log = logging.getLogger(__name__)

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


class HuggingFaceHub(Hub):
    source = "huggingface"
    name = "Hugging Face"
    cache_env = "HF_HUB_CACHE (or HF_HOME)"
    mirror_env = "HF_ENDPOINT"
    token_env = "HF_TOKEN"

    def forced_offline(self) -> bool:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)

    def endpoints(self, endpoint: str | None) -> tuple[str, ...]:
        if endpoint:
            return (normalize_url(endpoint),)
        return (normalize_url(os.environ.get("HF_ENDPOINT", "").strip() or HF_DEFAULT_ENDPOINT),)

    def _kwargs(self, revision: str | None, endpoints: tuple[str, ...], allow_patterns: Sequence[str] | None) -> dict:
        patterns = list(allow_patterns) if allow_patterns else None
        return {"revision": revision, "cache_dir": self.cache_dir, "endpoint": endpoints[0], "allow_patterns": patterns}

    def cached(
        self, model: str, revision: str | None, endpoints: tuple[str, ...], allow_patterns: Sequence[str] | None
    ) -> Path | None:
        import huggingface_hub
        from huggingface_hub import errors

        try:
            path = huggingface_hub.snapshot_download(
                model, local_files_only=True, **self._kwargs(revision, endpoints, allow_patterns)
            )
        except errors.HFValidationError as exc:
            raise invalid_id_error(self, model, f"valid Hugging Face repo id ({exc})") from exc
        except Exception as exc:  # LocalEntryNotFoundError and friends
            log.debug("Hugging Face cache miss for %s: %s", model, exc)
            return None
        return Path(path)

    def download(
        self,
        model: str,
        revision: str | None,
        endpoints: tuple[str, ...],
        progress: bool,
        allow_patterns: Sequence[str] | None,
    ) -> Path:
        import huggingface_hub
        from huggingface_hub import errors

        kwargs = self._kwargs(revision, endpoints, allow_patterns)
        if not progress:
            kwargs["tqdm_class"] = _silent_tqdm()
        try:
            return Path(huggingface_hub.snapshot_download(model, **kwargs))
        except errors.GatedRepoError as exc:
            raise access_denied_error(self, model, str(exc)) from exc
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
            raise not_found_error(self, model, revision, endpoints, str(exc)) from exc
        except errors.HFValidationError as exc:
            raise invalid_id_error(self, model, f"valid Hugging Face repo id ({exc})") from exc
        except errors.LocalEntryNotFoundError as exc:  # the hub vanished between probe and download
            raise unreachable_error(self, model, revision, endpoints, str(exc)) from exc
        except Exception as exc:
            raise failed_error(self, model, exc) from exc

    def list_files(self, model: str, revision: str | None, endpoints: tuple[str, ...]) -> list[str]:
        from huggingface_hub import HfApi, errors

        try:
            return list(HfApi(endpoint=endpoints[0]).list_repo_files(model, revision=revision))
        except errors.GatedRepoError as exc:
            raise access_denied_error(self, model, str(exc)) from exc
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
            raise not_found_error(self, model, revision, endpoints, str(exc)) from exc
        except errors.HFValidationError as exc:
            raise invalid_id_error(self, model, f"valid Hugging Face repo id ({exc})") from exc
        except Exception as exc:
            raise unreachable_error(self, model, revision, endpoints, f"{type(exc).__name__}: {exc}") from exc

    def cache_location(self, model: str, revision: str | None) -> tuple[Path, Path]:
        if self.cache_dir is not None:
            root = self.cache_dir
        else:
            from huggingface_hub import constants

            root = Path(constants.HF_HUB_CACHE)
        return root, root / f"models--{model.replace('/', '--')}" / "snapshots"


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm
