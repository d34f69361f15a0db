"""The API server's routing table: synced from the controller, dispatched locally.

Requests cost one hop (API server -> worker): the table is refreshed in the background, the
dispatch policy runs here with this server's own in-flight counts, and a worker that refuses
connections (or stops answering) is taken out of rotation at once instead of waiting for its
heartbeats to lapse; it returns only once its `/health` answers again, or when a new process
registers at its address.  If the controller is unreachable the last table is kept, and while a
restarted controller is still warming up (workers not yet registered again) known workers are kept
too, so serving goes on through controller restarts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from llmstack.common.errors import NotFound, ServiceUnavailable
from llmstack.common.net import bearer, judge_health
from llmstack.common.wire import DispatchMethod, WorkerEntry, WorkerTable
from llmstack.services.dispatch import Candidate, choose

log = logging.getLogger("llmstack.api.routing")


@dataclass
class Route:
    entry: WorkerEntry
    inflight: int = 0

    @property
    def address(self) -> str:
        return self.entry.worker_address


class RoutingTable:
    def __init__(
        self,
        controller_address: str,
        client: httpx.AsyncClient,
        *,
        sync_interval: float = 1.0,
        failure_cooldown: float = 2.0,
        cluster_token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller_address = controller_address.rstrip("/")
        self.client = client
        self.sync_interval = sync_interval
        self.failure_cooldown = failure_cooldown
        self.headers = bearer(cluster_token)
        self.clock = clock
        self.rng = random.Random()
        self.dispatch_method: DispatchMethod = "shortest_queue"
        self.routes: dict[str, Route] = {}
        self.by_model: dict[str, list[Route]] = {}
        self.known_models: set[str] = set()
        self.failed_at: dict[str, float] = {}
        self.last_sync: float | None = None
        self.failovers: dict[tuple[str, str], int] = {}  # (model, reason) -> requests moved to another worker
        self.sync_problem: str | None = None  # why the last sync failed (logged when it changes)

    # -- syncing ---------------------------------------------------------------------------------------
    async def sync_once(self) -> bool:
        """Fetch the controller's table; on failure keep the last one (serving continues without the
        controller) and say why, once per change of cause."""
        url = f"{self.controller_address}/workers"
        try:
            resp = await self.client.get(url, headers=self.headers, timeout=2.0)
        except httpx.HTTPError as exc:
            return self._sync_failed(f"cannot reach the controller at {url} ({type(exc).__name__})")
        if resp.status_code in (401, 403):
            return self._sync_failed(
                f"the controller at {url} refused the routing-table sync (HTTP {resp.status_code}): this API "
                "server's --cluster-token (LLMSTACK_CLUSTER_TOKEN) differs from the controller's; until it matches "
                "no worker is routable"
            )
        try:
            resp.raise_for_status()
            table = WorkerTable.model_validate_json(resp.content)
        except (httpx.HTTPStatusError, ValidationError) as exc:
            return self._sync_failed(f"the controller at {url} gave no routing table ({_short(exc)})")
        if self.sync_problem is not None:
            log.info("routing-table sync works again")
            self.sync_problem = None
        self.apply(table)
        return True

    def _sync_failed(self, problem: str) -> bool:
        if problem != self.sync_problem:  # a lasting failure is logged once, not every sync interval
            log.warning("%s; keeping the last routing table (%d workers)", problem, len(self.routes))
            self.sync_problem = problem
        return False

    def apply(self, table: WorkerTable) -> None:
        self.dispatch_method = table.dispatch_method
        routes: dict[str, Route] = {}
        for entry in table.workers:
            old = self.routes.get(entry.worker_address)
            if old is not None and old.entry.worker_id != entry.worker_id:
                self.failed_at.pop(entry.worker_address, None)  # a new process took the address
            if old is not None:  # the same object: requests under way decrement the count they incremented
                old.entry = entry
                routes[entry.worker_address] = old
            else:
                routes[entry.worker_address] = Route(entry)
        if table.warming_up:  # a restarted controller: keep healthy workers it has not heard from yet
            for address, old in self.routes.items():
                if address not in routes and address not in self.failed_at:
                    routes[address] = old
        for address in [a for a in self.failed_at if a not in routes]:
            del self.failed_at[address]
        by_model: dict[str, list[Route]] = {}
        for route in routes.values():
            for name in route.entry.model_names:
                by_model.setdefault(name, []).append(route)
        self.routes, self.by_model = routes, by_model
        self.known_models |= by_model.keys()
        self.last_sync = self.clock()

    async def run(self) -> None:
        while True:
            await self.sync_once()
            await self.probe_failed()
            await asyncio.sleep(self.sync_interval)

    async def probe_failed(self) -> None:
        """Put failed workers back into rotation once their `/health` answers again (after the cooldown)."""
        now = self.clock()
        due = [a for a, t in self.failed_at.items() if now - t >= self.failure_cooldown and a in self.routes]
        if not due:
            return
        alive = await asyncio.gather(*(self.healthy(a) for a in due))
        for address, ok in zip(due, alive, strict=True):
            if ok and self.failed_at.get(address, now + 1) <= now:  # not failed again meanwhile
                log.info("worker %s answers again; back in rotation", address)
                del self.failed_at[address]

    async def healthy(self, address: str, timeout: float = 1.0) -> bool:
        try:
            resp = await self.client.get(f"{address}/health", timeout=timeout)
        except (httpx.HTTPError, OSError):
            return False
        return judge_health(resp)[0]

    # -- dispatch ---------------------------------------------------------------------------------------
    def models(self) -> dict[str, WorkerEntry]:
        return {name: routes[0].entry for name, routes in sorted(self.by_model.items())}

    def context_length(self, model: str) -> int | None:
        routes = self.by_model.get(model)
        return routes[0].entry.context_length if routes else None

    def pick(self, model: str, exclude: set[str] = frozenset()) -> Route:  # type: ignore[assignment]
        routes = self.by_model.get(model)
        if not routes:
            if model in self.known_models:
                raise ServiceUnavailable(f"No worker is serving '{model}' right now; try again shortly.")
            raise NotFound(f"The model '{model}' does not exist.", param="model")
        usable = [r for r in routes if r.address not in exclude and r.address not in self.failed_at]
        if not usable:
            raise ServiceUnavailable(f"All workers for '{model}' are unavailable right now; try again shortly.")
        candidates = [
            Candidate(r.address, r.entry.status.speed, max(r.inflight, r.entry.status.queue_length)) for r in usable
        ]
        address = choose(candidates, self.dispatch_method, self.rng).address
        return self.routes[address]

    def mark_failed(self, route: Route, reason: str) -> None:
        if route.address not in self.failed_at:
            log.warning("worker %s failed (%s); out of rotation until it answers again", route.address, reason)
        self.failed_at[route.address] = self.clock()

    def usable(self) -> dict[str, int]:
        """Workers per model that requests may be sent to now (not failed)."""
        return {
            name: sum(1 for r in routes if r.address not in self.failed_at)
            for name, routes in sorted(self.by_model.items())
        }

    def count_failover(self, model: str, reason: str) -> None:
        key = (model, reason)
        self.failovers[key] = self.failovers.get(key, 0) + 1

    def mark_ok(self, route: Route) -> None:
        self.failed_at.pop(route.address, None)


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
