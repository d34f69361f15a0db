"""The OpenAI-compatible HTTP app: routes only; the work lives in `serving`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from llmstack.common.errors import NotFound
from llmstack.common.http import StreamingResponseWithDisconnect, install_error_handlers
from llmstack.common.metrics import UNKNOWN_MODEL, MetricsMiddleware, ServingMetrics, counter_collector, gauge_collector
from llmstack.services.api.chat import ChatCompletions
from llmstack.services.api.completions import TextCompletions
from llmstack.services.api.embeddings import Embeddings
from llmstack.services.api.keys.access import KeyService, KeysMiddleware, key_collectors, require_key
from llmstack.services.api.keys.rules import KeyRule, flat_rules
from llmstack.services.api.keys.source import KeysSource
from llmstack.services.api.keys.usage import UsageStore
from llmstack.services.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llmstack.services.api.routing import RoutingTable
from llmstack.services.api.upstream import WorkerStream

log = logging.getLogger("llmstack.api")


@dataclass
class APISettings:
    controller_address: str = "http://127.0.0.1:21001"
    api_keys: list[str] = field(default_factory=list)  # plain keys: unlimited, named key-1, key-2, ...
    key_rules: list[KeyRule] = field(default_factory=list)  # named keys with models and limits
    keys_file: Path | None = None  # more named keys, reloaded when the file changes and on SIGHUP
    state_dir: Path | None = None  # usage accounting (usage.db) lives here; None: not recorded
    cluster_token: str | None = None
    sync_interval: float = 1.0
    failure_cooldown: float = 2.0
    request_timeout: float = 600.0  # end to end, per request
    stream_timeout: float = 60.0  # longest silence of a worker between two events of a stream
    max_attempts: int = 3


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}


def _endpoint(path: str) -> str | None:
    """Bounded endpoint labels for metrics; None for paths that are not counted."""
    if not path.startswith("/v1/"):
        return None
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


def build_api_app(settings: APISettings) -> FastAPI:
    """The app; raises `KeysFileError` when the keys cannot be used and `StateDirInUse` when another server
    records usage in the state directory (before anything is served)."""
    source = KeysSource([*flat_rules(settings.api_keys), *settings.key_rules], settings.keys_file)
    store = UsageStore(settings.state_dir) if settings.state_dir is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # one pooled client for the process; generous limits since every request is one worker hop
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.request_timeout, connect=3.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )
        router = RoutingTable(
            settings.controller_address,
            client,
            sync_interval=settings.sync_interval,
            failure_cooldown=settings.failure_cooldown,
            cluster_token=settings.cluster_token,
        )
        await router.sync_once()
        workers = WorkerStream(
            router,
            client,
            settings.max_attempts,
            stream_timeout=settings.stream_timeout,
            request_timeout=settings.request_timeout,
        )
        app.state.router = router
        app.state.chat = ChatCompletions(workers)
        app.state.completions = TextCompletions(workers)
        app.state.embeddings = Embeddings(workers)
        app.state.keys = KeyService(source, store, lambda: router.by_model)
        tasks = [asyncio.create_task(router.run()), asyncio.create_task(app.state.keys.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await client.aclose()
            if store is not None:
                await asyncio.to_thread(store.close)

    app = FastAPI(title="llmstack OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    metrics = ServingMetrics("api")
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=_endpoint)
    app.add_middleware(KeysMiddleware)

    def routed_workers():  # noqa: ANN202
        router: RoutingTable | None = getattr(app.state, "router", None)
        return [([m], float(len(r))) for m, r in router.by_model.items()] if router else []

    def failovers():  # noqa: ANN202
        router: RoutingTable | None = getattr(app.state, "router", None)
        return [([m, reason], float(n)) for (m, reason), n in router.failovers.items()] if router else []

    metrics.registry.register(
        gauge_collector(
            "llmstack_api_workers", "Live workers per model in the routing table.", ["model"], routed_workers
        )
    )
    metrics.registry.register(
        counter_collector(
            "llmstack_api_failovers",
            "Requests moved to another worker before their first token, by reason.",
            ["model", "reason"],
            failovers,
        )
    )

    for collector in key_collectors(source.limits):
        metrics.registry.register(collector)

    def track(request: Request, model: str):  # noqa: ANN202
        served = request.app.state.router.by_model
        tracker = metrics.track(model if model in served else UNKNOWN_MODEL)
        request.state.tracker = tracker
        request.app.state.keys.admit(request, model)  # 404 for a model the key may not use, 429 over a limit
        return tracker

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models")
    async def list_models(request: Request) -> dict:
        names = request.app.state.keys.visible(request, list(request.app.state.router.models()))
        return {"object": "list", "data": [_model_card(name) for name in names]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict:
        if not request.app.state.keys.visible(request, [m for m in request.app.state.router.models() if m == model]):
            raise NotFound(f"The model '{model}' does not exist.", param="model")
        return _model_card(model)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):  # noqa: ANN201
        chat: ChatCompletions = request.app.state.chat
        tracker = track(request, req.model)
        if req.stream:
            stream = await chat.chat_stream(req, tracker)
            return StreamingResponseWithDisconnect(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
        return JSONResponse(await chat.chat(req, tracker))

    @v1.post("/completions")
    async def completions_(req: CompletionRequest, request: Request):  # noqa: ANN201
        completions: TextCompletions = request.app.state.completions
        tracker = track(request, req.model)
        if req.stream:
            stream = await completions.complete_stream(req, tracker)
            return StreamingResponseWithDisconnect(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
        return JSONResponse(await completions.complete(req, tracker))

    @v1.post("/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request) -> JSONResponse:
        return JSONResponse(await request.app.state.embeddings.create(req, track(request, req.model)))

    app.include_router(v1)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint():  # noqa: ANN202
        return metrics.render()

    @app.get("/health")
    async def health(request: Request) -> dict:
        router: RoutingTable = request.app.state.router
        age = None if router.last_sync is None else round(time.monotonic() - router.last_sync, 3)
        return {
            "status": "ok",
            "models": sorted(router.models()),
            "workers": router.usable(),
            "routing_table_age": age,
        }

    return app


_STARTED = int(time.time())


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "llmstack"}
