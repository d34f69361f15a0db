"""The client side of the supervisor's admin API (`stack/admin.py`), for `llmstack models` and `status`:
found through the run directory, authenticated with the admin key (its variable, else the key file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from llmstack.common.errors import LLMStackError
from llmstack.stack.admin import KEY_FILE, ModelReply, read_admin_info
from llmstack.stack.lifecycle import LifecycleEvent, ModelRow


class AdminUnavailable(Exception):
    """No admin API to talk to (the stack is not running, or runs no models); the message says which."""


class AdminClient:
    def __init__(self, url: str, key: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, trust_env=False)

    @classmethod
    def for_run_dir(cls, root: Path) -> AdminClient:
        info = read_admin_info(root)
        if info is None:
            raise AdminUnavailable(f"no admin API recorded in {root} (is the stack running, with [[models]]?)")
        key = os.environ.get(info.key_env, "").strip() if info.key_env else None
        if not key:
            try:
                key = (root / KEY_FILE).read_text(encoding="utf-8").strip()
            except OSError:
                where = f"${info.key_env}" if info.key_env else str(root / KEY_FILE)
                raise AdminUnavailable(f"no admin key: set {where}") from None
        return cls(info.url, key)

    def _call(self, method: str, path: str, http_timeout: float | None = None, **params: Any) -> dict[str, Any]:
        try:
            resp = self.client.request(
                method, f"{self.url}{path}", headers=self.headers, params=params or None, timeout=http_timeout
            )
        except httpx.HTTPError as exc:
            raise AdminUnavailable(f"the admin API at {self.url} does not answer ({type(exc).__name__})") from exc
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 400:
            raise LLMStackError.from_body(body if isinstance(body, dict) else {}, resp.status_code)
        return body

    def models(self) -> list[ModelRow]:
        return [ModelRow.model_validate(r) for r in self._call("GET", "/models")["models"]]

    def events(self) -> list[LifecycleEvent]:
        return [LifecycleEvent.model_validate(e) for e in self._call("GET", "/events")["events"]]

    def load(self, name: str, *, wait: bool = True, timeout: float = 900.0) -> ModelReply:
        body = self._call("POST", f"/models/{name}/load", timeout + 10, wait=str(wait).lower(), timeout=timeout)
        return ModelReply.model_validate(body)

    def unload(self, name: str, *, wait: bool = True, timeout: float = 120.0) -> ModelReply:
        body = self._call("POST", f"/models/{name}/unload", timeout + 10, wait=str(wait).lower(), timeout=timeout)
        return ModelReply.model_validate(body)

    def close(self) -> None:
        self.client.close()
