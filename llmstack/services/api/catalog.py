"""The stack's declared models as the API server sees them: their load states, from the supervisor's admin
API, and the wait for one that is not loaded yet.

A request for an on-demand model that no worker serves makes the API server *demand* it from the
supervisor (`POST /models/{name}/demand`, with the cluster token: it may only ask for what a request would),
then wait, up to `load_wait` and never past the request's own deadline, for the load to finish and the
model to appear in the routing table; the request then goes on as any other. Concurrent requests for the
same model share one demand, so they start one worker. A load that fails, or a model that cannot fit the
memory budget, answers 503 with the supervisor's cause.

The admin API's address comes from `--admin-url`, else from the run directory (`admin.json`, written by the
supervisor), read again until found. Without either, nothing here does anything: requests behave as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from llmstack.common.errors import LLMStackError, ServiceUnavailable
from llmstack.services.api.routing import RoutingTable

log = logging.getLogger("llmstack.api.catalog")


class ModelCatalog:
    def __init__(
        self,
        client: httpx.AsyncClient,
        router: RoutingTable,
        *,
        admin_url: str | None = None,
        state_dir: Path | None = None,
        cluster_token: str | None = None,
        load_wait: float = 120.0,
        sync_interval: float = 1.0,
    ) -> None:
        self.client = client
        self.router = router
        self.admin_url = admin_url.rstrip("/") if admin_url else None
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else None
        self.headers = {"Authorization": f"Bearer {cluster_token}"} if cluster_token else {}
        self.load_wait = load_wait
        self.sync_interval = max(sync_interval, 0.5)
        self.rows: dict[str, dict[str, Any]] = {}  # by every served name
        self._demands: dict[str, asyncio.Task[None]] = {}

    # -- the states ---------------------------------------------------------------------------------------
    def _address(self) -> str | None:
        if self.admin_url is None and self.state_dir is not None:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                info = json.loads((self.state_dir / "admin.json").read_text(encoding="utf-8"))
                return str(info["url"]).rstrip("/")
        return self.admin_url

    async def sync_once(self) -> bool:
        url = self._address()
        if url is None:
            return False
        try:
            resp = await self.client.get(f"{url}/models", headers=self.headers, timeout=2.0)
            resp.raise_for_status()
            rows = resp.json()["models"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.debug("model states from %s unavailable: %s", url, exc)
            return False
        self.rows = {name: row for row in rows for name in row.get("names", [row.get("name")])}
        return True

    async def run(self) -> None:
        while True:
            await self.sync_once()
            await asyncio.sleep(self.sync_interval)

    def names(self) -> list[str]:
        return sorted(self.rows)

    def status(self, model: str) -> str | None:
        """loaded, loading, unloaded, unloading or failed; None for a model the stack does not declare."""
        row = self.rows.get(model)
        if row is None:
            return None
        if row.get("state") == "loaded" and model not in self.router.by_model:
            return "loading"  # its worker is up but not yet in this server's routing table
        return str(row.get("state"))

    # -- waiting for a load -------------------------------------------------------------------------------
    async def ensure(self, model: str, deadline: float) -> None:
        """Return once `model` is routable, loading it first if it is declared and not loaded; raises
        `ServiceUnavailable` (with the cause) when it does not load in time or cannot load."""
        if self.router.by_model.get(model) or self._address() is None:
            return
        if model not in self.rows:
            await self.sync_once()
            if model not in self.rows:
                return  # not one of ours: the router answers (404, or 503 for a known model)
        wait = min(self.load_wait, deadline - time.monotonic())
        if wait <= 0:
            raise ServiceUnavailable(f"The model '{model}' is not loaded and the request has no time left to wait.")
        t0 = time.monotonic()
        task = self._demands.get(model)
        if task is None or task.done():
            task = asyncio.create_task(self._demand(model, self.load_wait))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen by its waiters, if any
            self._demands[model] = task
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(task)
                await self._routable(model)
        except TimeoutError:
            raise ServiceUnavailable(
                f"The model '{model}' is still loading after {wait:.0f}s; try again shortly "
                "(the wait is [api] load_wait).",
                code="model_loading",
            ) from None
        log.info("model %s ready for a request after %.1fs", model, time.monotonic() - t0)

    async def _demand(self, model: str, wait: float) -> None:
        try:
            await self._ask(model, wait)
        finally:
            await self.sync_once()  # the states /v1/models shows follow at once

    async def _ask(self, model: str, wait: float) -> None:
        url = self._address()
        try:
            resp = await self.client.post(
                f"{url}/models/{model}/demand", params={"timeout": wait}, headers=self.headers, timeout=wait + 10
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"The model '{model}' is not loaded and the supervisor ({url}) cannot be asked to load it "
                f"({type(exc).__name__})."
            ) from exc
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 400:
            error = LLMStackError.from_body(body if isinstance(body, dict) else {}, resp.status_code)
            if error.status_code < 500:  # our own credentials or a bug: not the client's fault
                raise ServiceUnavailable(f"The model '{model}' could not be demanded: {error.message}") from None
            raise error
        if resp.status_code == 202:
            raise ServiceUnavailable(
                f"The model '{model}' is still loading after {wait:.0f}s; try again shortly.", code="model_loading"
            )

    async def _routable(self, model: str) -> None:
        """The supervisor saw the worker healthy; wait for this server's routing table to list it."""
        while not self.router.by_model.get(model):
            await self.router.sync_once()
            if self.router.by_model.get(model):
                return
            await asyncio.sleep(0.1)
