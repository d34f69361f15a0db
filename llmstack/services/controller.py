"""The controller: an in-memory registry of workers, their heartbeats and dispatch.

Workers register and heartbeat; silent ones expire.  API servers sync the whole table (`GET
/workers`) and dispatch locally, so the controller is off the per-request path; `POST
/workers/lookup` remains for simple clients and other tools.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from llmstack.common.errors import AuthenticationError, Conflict, NotFound, ServiceUnavailable
from llmstack.common.http import check_bearer, install_error_handlers
from llmstack.common.metrics import counter_collector, gauge_collector
from llmstack.common.wire import (
    DispatchMethod,
    Heartbeat,
    HeartbeatReply,
    Lookup,
    Unregister,
    WorkerEntry,
    WorkerRegistration,
    WorkerTable,
)
from llmstack.services.dispatch import Candidate, choose

log = logging.getLogger("llmstack.controller")


@dataclass
class ControllerSettings:
    dispatch_method: DispatchMethod = "shortest_queue"
    heartbeat_expiry: float = 10.0
    cluster_token: str | None = None


@dataclass
class _Worker:
    registration: WorkerRegistration
    registered_at: float
    last_heartbeat: float


class Registry:
    """Workers by address.  A clock is injected so expiry is testable without sleeping."""

    def __init__(self, settings: ControllerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.rng = random.Random()
        self._workers: dict[str, _Worker] = {}
        self.started_at = clock()
        self.events = {"registered": 0, "replaced": 0, "expired": 0, "unregistered": 0, "refused": 0}

    def register(self, reg: WorkerRegistration) -> None:
        current = self._workers.get(reg.worker_address)
        if current and current.registration.worker_id == reg.worker_id and self._alive(current):
            raise Conflict(
                f"worker {reg.worker_id} is already registered at {reg.worker_address}; "
                "send heartbeats instead of registering again",
                code="already_registered",
            )
        now = self.clock()
        verb = "replaced" if current else "registered"
        self.events[verb] += 1
        self._workers[reg.worker_address] = _Worker(reg, now, now)
        log.info("%s worker %s at %s for %s", verb, reg.worker_id, reg.worker_address, reg.model_names)

    def heartbeat(self, beat: Heartbeat) -> bool:
        worker = self._workers.get(beat.worker_address)
        if worker is None or worker.registration.worker_id != beat.worker_id or not self._alive(worker):
            return False
        worker.last_heartbeat = self.clock()
        worker.registration.status = beat.status
        return True

    def unregister(self, req: Unregister) -> bool:
        worker = self._workers.get(req.worker_address)
        if worker is None or worker.registration.worker_id != req.worker_id:
            return False
        del self._workers[req.worker_address]
        self.events["unregistered"] += 1
        log.info("unregistered worker %s at %s", req.worker_id, req.worker_address)
        return True

    def expire(self) -> list[str]:
        gone = [addr for addr, w in self._workers.items() if not self._alive(w)]
        for addr in gone:
            log.warning("worker at %s missed its heartbeats; removed", addr)
            self.events["expired"] += 1
            del self._workers[addr]
        return gone

    def _alive(self, worker: _Worker) -> bool:
        return self.clock() - worker.last_heartbeat <= self.settings.heartbeat_expiry

    def live_workers(self) -> list[_Worker]:
        return [w for w in self._workers.values() if self._alive(w)]

    def table(self) -> WorkerTable:
        now = self.clock()
        entries = [
            WorkerEntry(
                **w.registration.model_dump(),
                heartbeat_age=round(now - w.last_heartbeat, 3),
                registered_at=w.registered_at,
            )
            for w in self.live_workers()
        ]
        # right after a (re)start the table is incomplete until every live worker's next heartbeat
        warming_up = now - self.started_at < self.settings.heartbeat_expiry
        return WorkerTable(dispatch_method=self.settings.dispatch_method, workers=entries, warming_up=warming_up)

    def models(self) -> list[str]:
        return sorted({name for w in self.live_workers() for name in w.registration.model_names})

    def lookup(self, model: str) -> str:
        known = {name for w in self._workers.values() for name in w.registration.model_names}
        if model not in known:
            raise NotFound(f"The model '{model}' does not exist.", param="model")
        live = [w for w in self.live_workers() if model in w.registration.model_names]
        if not live:
            raise ServiceUnavailable(f"No live worker serves '{model}' right now.")
        candidates = [
            Candidate(w.registration.worker_address, w.registration.status.speed, w.registration.status.queue_length)
            for w in live
        ]
        return choose(candidates, self.settings.dispatch_method, self.rng).address


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def build_controller_app(settings: ControllerSettings) -> FastAPI:
    registry = Registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def expire_loop() -> None:
            while True:
                await asyncio.sleep(max(0.2, settings.heartbeat_expiry / 4))
                registry.expire()

        task = asyncio.create_task(expire_loop())
        yield
        task.cancel()

    app = FastAPI(title="llmstack controller", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    install_error_handlers(app)
    metrics = CollectorRegistry()

    def workers_per_model():
        counts: dict[str, int] = {}
        for w in registry.live_workers():
            for name in w.registration.model_names:
                counts[name] = counts.get(name, 0) + 1
        return [([name], float(n)) for name, n in counts.items()]

    def events():
        return [([event], float(n)) for event, n in registry.events.items()]

    metrics.register(
        gauge_collector("llmstack_controller_workers", "Live workers per model.", ["model"], workers_per_model)
    )
    metrics.register(
        counter_collector("llmstack_controller_worker_events", "Worker registry events.", ["event"], events)
    )
    tokens = [settings.cluster_token] if settings.cluster_token else []

    async def require_token(request: Request) -> None:  # async: a plain def would run in the thread pool
        try:
            check_bearer(request, tokens, what="cluster token")
        except AuthenticationError:
            registry.events["refused"] += 1
            log.warning("refused %s from %s: missing or wrong cluster token", request.url.path, _client(request))
            raise

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "workers": len(registry.live_workers()), "models": registry.models()}

    @app.post("/workers/register", dependencies=[Depends(require_token)])
    async def register(reg: WorkerRegistration) -> dict:
        registry.register(reg)
        return {"registered": True}

    @app.post("/workers/heartbeat", dependencies=[Depends(require_token)])
    async def heartbeat(beat: Heartbeat) -> HeartbeatReply:
        return HeartbeatReply(known=registry.heartbeat(beat))

    @app.post("/workers/unregister", dependencies=[Depends(require_token)])
    async def unregister(req: Unregister) -> dict:
        return {"unregistered": registry.unregister(req)}

    @app.get("/workers", dependencies=[Depends(require_token)])
    async def workers() -> WorkerTable:
        return registry.table()

    @app.get("/models")
    async def models() -> dict:
        return {"models": registry.models()}

    @app.post("/workers/lookup", dependencies=[Depends(require_token)])
    async def lookup(req: Lookup) -> dict:
        return {"address": registry.lookup(req.model)}

    return app
