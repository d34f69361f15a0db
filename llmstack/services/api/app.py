"""The API server's HTTP app: routes and auth only; the work lives in the serving modules (chat,
completions, embeddings, responses, messages, tokenize)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from llmstack.common.errors import NotFound
from llmstack.common.http import StreamingResponseWithDisconnect, install_error_handlers
from llmstack.common.metrics import (
    UNKNOWN_MODEL,
    MetricsMiddleware,
    RequestTracker,
    ServingMetrics,
    counter_collector,
    gauge_collector,
)
from llmstack.services.api.bodies import body
from llmstack.services.api.catalog import ModelCatalog
from llmstack.services.api.chat import ChatCompletions
from llmstack.services.api.completions import TextCompletions
from llmstack.services.api.embeddings import Embeddings
from llmstack.services.api.keys.access import KeyService, KeysMiddleware, admit, key_collectors, require_key
from llmstack.services.api.keys.ring import ANONYMOUS
from llmstack.services.api.keys.rules import KeyRule, flat_rules
from llmstack.services.api.keys.source import KeysSource
from llmstack.services.api.keys.usage import UsageStore
from llmstack.services.api.messages.errors import anthropic_error
from llmstack.services.api.messages.protocol import CountTokensRequest, MessagesRequest
from llmstack.services.api.messages.serving import Messages
from llmstack.services.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llmstack.services.api.responses.protocol import ResponsesRequest
from llmstack.services.api.responses.serving import Responses
from llmstack.services.api.responses.store import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_RESPONSES,
    MemoryStore,
    ResponseStore,
    SQLiteStore,
)
from llmstack.services.api.routing import RoutingTable
from llmstack.services.api.tokenize import DetokenizeRequest, Tokenizer, TokenizeRequest
from llmstack.services.api.upstream import WorkerStream

log = logging.getLogger("llmstack.api")


@dataclass
class APISettings:
    controller_address: str = "http://127.0.0.1:21001"
    api_keys: list[str] = field(default_factory=list)  # plain keys: unlimited, named key-1, key-2, ...
    key_rules: list[KeyRule] = field(default_factory=list)  # named keys with models and limits
    keys_file: Path | None = None  # more named keys, reloaded when the file changes and on SIGHUP
    cluster_token: str | None = None
    sync_interval: float = 1.0
    failure_cooldown: float = 2.0
    request_timeout: float = 600.0  # end to end, per request
    stream_timeout: float = 60.0  # longest silence of a worker between two events of a stream
    max_attempts: int = 3
    # usage accounting (usage.db) and stored responses (responses.sqlite3) live here; None: usage is not
    # recorded and stored responses live in memory
    state_dir: Path | None = None
    response_retention: int = DEFAULT_MAX_RESPONSES  # the most stored responses kept
    response_max_age: float = DEFAULT_MAX_AGE  # seconds a stored response is kept
    admin_url: str | None = None  # the supervisor's admin API (models loaded at run time); default: state_dir's
    load_wait: float = 120.0  # how long a request waits for its model to load


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ENDPOINTS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
}


def _endpoint(path: str) -> str | None:
    """Bounded endpoint labels for metrics; None for paths that are not counted."""
    if path in _ENDPOINTS:
        return path
    if not path.startswith("/v1/"):
        return None
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


async def _open_store(settings: APISettings) -> ResponseStore:
    if settings.state_dir is None:
        return MemoryStore(settings.response_retention, settings.response_max_age)
    path = Path(settings.state_dir).expanduser() / "responses.sqlite3"
    return await asyncio.to_thread(SQLiteStore, path, settings.response_retention, settings.response_max_age)


Track = Callable[[Request, str], RequestTracker]


def build_api_app(settings: APISettings) -> FastAPI:
    """The app; raises `KeysFileError` when the keys cannot be used and `StateDirInUse` when another server
    records usage in the state directory (before anything is served)."""
    keys = KeysSource([*flat_rules(settings.api_keys), *settings.key_rules], settings.keys_file)
    usage = UsageStore(Path(settings.state_dir)) if settings.state_dir is not None else None
    app = FastAPI(
        title="llmstack OpenAI-compatible API",
        lifespan=_lifespan(settings, keys, usage),
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # `/v1/responses/` is an unknown route (404 in OpenAI's shape), not a 307 elsewhere
    )
    install_error_handlers(app, shapes=[("/v1/messages", anthropic_error)])
    metrics = ServingMetrics("api")
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=_endpoint)
    app.add_middleware(KeysMiddleware)
    _register_gauges(app, metrics)
    for collector in key_collectors(keys.limits):
        metrics.registry.register(collector)

    def track(request: Request, model: str) -> RequestTracker:
        served = request.app.state.router.by_model
        tracker = metrics.track(model if model in served else UNKNOWN_MODEL)
        request.state.tracker = tracker
        admit(request, model)  # 404 for a model the key may not use, 429 over a limit
        return tracker

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_identify)])
    _openai_routes(v1, track)
    _responses_routes(v1, track)
    _messages_routes(v1, track)
    app.include_router(v1)
    # vLLM's token endpoints sit outside /v1; they need a key all the same
    tokens = APIRouter(dependencies=[Depends(_identify)])
    _token_routes(tokens)
    app.include_router(tokens)
    _service_routes(app, metrics)
    return app


async def _identify(request: Request) -> None:
    """The key check every route takes; stored responses then belong to the key's name."""
    await require_key(request)
    key = getattr(request.state, "key", None)
    request.state.owner = key.name if key is not None and key.name != ANONYMOUS else ""


def _lifespan(
    settings: APISettings, keys: KeysSource, usage: UsageStore | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
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
        store = await _open_store(settings)
        catalog = ModelCatalog(
            client,
            router,
            admin_url=settings.admin_url,
            state_dir=settings.state_dir,
            cluster_token=settings.cluster_token,
            load_wait=settings.load_wait,
            sync_interval=settings.sync_interval,
        )
        workers.catalog = catalog  # a request for a model not loaded yet waits for its load
        app.state.catalog = catalog
        app.state.router = router
        app.state.chat = ChatCompletions(workers)
        app.state.completions = TextCompletions(workers)
        app.state.embeddings = Embeddings(workers)
        app.state.responses = Responses(workers, store)
        app.state.messages = Messages(workers)
        app.state.tokenizer = Tokenizer(workers)
        app.state.keys = KeyService(keys, usage, lambda: router.by_model)
        tasks = [asyncio.create_task(t) for t in (router.run(), app.state.keys.run(), catalog.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await store.close()
            await client.aclose()
            if usage is not None:
                await asyncio.to_thread(usage.close)

    return lifespan


def _register_gauges(app: FastAPI, metrics: ServingMetrics) -> None:
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


def _sse(stream: AsyncIterator[bytes]) -> StreamingResponseWithDisconnect:
    return StreamingResponseWithDisconnect(stream, media_type="text/event-stream", headers=_SSE_HEADERS)


def _openai_routes(v1: APIRouter, track: Track) -> None:
    @v1.get("/models")
    async def list_models(request: Request) -> dict:
        catalog: ModelCatalog = request.app.state.catalog
        known = sorted({*request.app.state.router.models(), *catalog.names()})
        names = request.app.state.keys.visible(request, known)
        return {"object": "list", "data": [_model_card(name, catalog.status(name)) for name in names]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict:
        catalog: ModelCatalog = request.app.state.catalog
        known = [m for m in {*request.app.state.router.models(), *catalog.names()} if m == model]
        if not request.app.state.keys.visible(request, known):
            raise NotFound(f"The model '{model}' does not exist.", param="model")
        return _model_card(model, catalog.status(model))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request, req: ChatCompletionRequest = Depends(body(ChatCompletionRequest))):  # noqa: ANN201
        chat: ChatCompletions = request.app.state.chat
        tracker = track(request, req.model)
        if req.stream:
            return _sse(await chat.chat_stream(req, tracker))
        return JSONResponse(await chat.chat(req, tracker))

    @v1.post("/completions")
    async def completions_(request: Request, req: CompletionRequest = Depends(body(CompletionRequest))):  # noqa: ANN201
        completions: TextCompletions = request.app.state.completions
        tracker = track(request, req.model)
        if req.stream:
            return _sse(await completions.complete_stream(req, tracker))
        return JSONResponse(await completions.complete(req, tracker))

    @v1.post("/embeddings")
    async def embeddings(request: Request, req: EmbeddingRequest = Depends(body(EmbeddingRequest))) -> JSONResponse:
        return JSONResponse(await request.app.state.embeddings.create(req, track(request, req.model)))


def _responses_routes(v1: APIRouter, track: Track) -> None:
    @v1.post("/responses")
    async def create_response(request: Request, req: ResponsesRequest = Depends(body(ResponsesRequest))):  # noqa: ANN201
        responses: Responses = request.app.state.responses
        tracker = track(request, req.model)
        if req.stream:
            return _sse(await responses.create_stream(req, tracker, request.state.owner))
        return JSONResponse(await responses.create(req, tracker, request.state.owner))

    @v1.get("/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await request.app.state.responses.get(response_id, request.state.owner))

    @v1.delete("/responses/{response_id}")
    async def delete_response(response_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await request.app.state.responses.delete(response_id, request.state.owner))


def _messages_routes(v1: APIRouter, track: Track) -> None:
    @v1.post("/messages")
    async def create_message(request: Request, req: MessagesRequest = Depends(body(MessagesRequest))):  # noqa: ANN201
        messages: Messages = request.app.state.messages
        tracker = track(request, req.model)
        if req.stream:
            return _sse(await messages.create_stream(req, tracker))
        return JSONResponse(await messages.create(req, tracker))

    @v1.post("/messages/count_tokens")
    async def count_message_tokens(
        request: Request, req: CountTokensRequest = Depends(body(CountTokensRequest))
    ) -> JSONResponse:
        if req.model is not None:
            admit(request, req.model)
        return JSONResponse(await request.app.state.messages.count_tokens(req))


def _token_routes(tokens: APIRouter) -> None:
    @tokens.post("/tokenize")
    async def tokenize(request: Request, req: TokenizeRequest = Depends(body(TokenizeRequest))) -> JSONResponse:
        if req.model is not None:
            admit(request, req.model)
        return JSONResponse(await request.app.state.tokenizer.tokenize(req))

    @tokens.post("/detokenize")
    async def detokenize(request: Request, req: DetokenizeRequest = Depends(body(DetokenizeRequest))) -> JSONResponse:
        if req.model is not None:
            admit(request, req.model)
        return JSONResponse(await request.app.state.tokenizer.detokenize(req))


def _service_routes(app: FastAPI, metrics: ServingMetrics) -> None:
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


_STARTED = int(time.time())


def _model_card(name: str, status: str | None = None) -> dict:
    """OpenAI's model object; `status` (loaded, loading, unloaded, unloading, failed) for the stack's own
    models, whose workers come and go."""
    card = {"id": name, "object": "model", "created": _STARTED, "owned_by": "llmstack"}
    if status is not None:
        card["status"] = status
    return card
