"""The model worker's HTTP app: one engine behind a small API, registered with a controller.

Routes: `POST /generate` (NDJSON stream of deltas), `POST /embeddings`, `POST /count_tokens` (also
tokenises), `POST /detokenize`, `GET /model_details`, `GET /health`, `GET /metrics`.  The work lives in `service.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from llmstack.common.errors import InvalidRequest, Overloaded, ServiceUnavailable
from llmstack.common.http import check_bearer, install_error_handlers
from llmstack.common.metrics import MetricsMiddleware, RequestTracker, counter_collector, gauge_collector
from llmstack.common.net import bearer, is_loopback
from llmstack.common.wire import CountTokensRequest, DetokenizeRequest, EmbedReply, EmbedRequest, GenerateRequest
from llmstack.services.engines.base import Engine
from llmstack.services.worker.link import ControllerLink
from llmstack.services.worker.service import WorkerService, WorkerSettings

__all__ = ["WorkerSettings", "build_worker_app"]

log = logging.getLogger("llmstack.worker")


def build_worker_app(settings: WorkerSettings, engine: Engine) -> FastAPI:
    service = WorkerService(settings, engine)
    app = FastAPI(title="llmstack worker", lifespan=_lifespan(service), docs_url=None, redoc_url=None)
    app.state.worker = service
    app.state.before_drain = service.begin_drain  # `common.http.serve` calls it on SIGTERM
    install_error_handlers(app)
    metrics = service.metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=_endpoint)
    _register_worker_gauges(service)
    _routes(app, service)
    return app


def _lifespan(service: WorkerService) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Load the engine (and its structured-output tables), link to the controller; undo it all on exit."""
    settings, engine = service.settings, service.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        if engine.kind == "chat":
            await service.on_text_thread(engine.prepare_structured_outputs)
        service.ready = True
        client = httpx.AsyncClient(timeout=5.0, headers=bearer(settings.cluster_token))
        if settings.register and settings.controller_address:
            service.link = ControllerLink(
                client, settings.controller_address, settings.heartbeat_interval, service.registration, service.status
            )
            service.link.start()
        log.info("worker %s serving %s at %s", settings.worker_id, settings.model_names, settings.worker_address)
        host = urlsplit(settings.worker_address).hostname or ""
        if not settings.cluster_token and not is_loopback(host):
            log.warning(
                "this worker is reachable at %s without a cluster token: anyone who can reach it can use it "
                "(set --cluster-token)",
                settings.worker_address,
            )
        try:
            yield
        finally:
            if service.link is not None:
                await service.link.stop()
            await client.aclose()
            await engine.close()
            service.text_thread.shutdown(wait=False, cancel_futures=True)

    return lifespan


def _routes(app: FastAPI, service: WorkerService) -> None:
    settings, engine, metrics = service.settings, service.engine, service.metrics

    def track(request: Request, model: str | None) -> RequestTracker:
        names = settings.model_names
        tracker = metrics.track(model if model in names else names[0])
        request.state.tracker = tracker
        return tracker

    require_token = _token_check(settings)
    _info_routes(app, service, require_token)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return metrics.render()

    @app.post("/generate", dependencies=[Depends(require_token)])
    async def generate(req: GenerateRequest, request: Request) -> StreamingResponse:
        tracker = track(request, req.model)
        if service.draining:  # the API server retries another worker on 503
            raise ServiceUnavailable("this worker is shutting down", code="worker_stopping")
        if engine.kind != "chat":
            raise InvalidRequest(
                f"'{settings.model_names[0]}' is an embedding model; use /v1/embeddings", param="model"
            )
        prompt_ids, params = await service.on_text_thread(service.admit_prompt, req)
        if service.admission.full:
            raise Overloaded(f"worker queue is full ({service.admission.max_queue} waiting)")
        echo = (req.prompt or "") if req.echo else None
        stream = service.stream(
            prompt_ids,
            params,
            echo,
            tracker,
            req.tools,
            chat=req.messages is not None,
            priority=req.priority,
            report_prompt=req.report_prompt_tokens,
        )
        return StreamingResponse(stream, media_type="application/x-ndjson")

    @app.post("/embeddings", dependencies=[Depends(require_token)])
    async def embeddings(req: EmbedRequest, request: Request) -> EmbedReply:
        if service.draining:
            raise ServiceUnavailable("this worker is shutting down", code="worker_stopping")
        truncate = settings.embed_in_truncate if req.truncate is None else req.truncate
        tracker = track(request, None)
        async with service.admission.slot():
            vectors, tokens = await engine.embed(req.input, truncate)
        tracker.usage(tokens, 0)
        return EmbedReply(embeddings=vectors, prompt_tokens=tokens)


def _token_check(settings: WorkerSettings) -> Callable[[Request], Awaitable[None]]:
    tokens = [settings.cluster_token] if settings.cluster_token else []

    async def require_token(request: Request) -> None:  # async: a plain def would run in the thread pool
        check_bearer(request, tokens, what="cluster token")

    return require_token


def _info_routes(app: FastAPI, service: WorkerService, require_token: Callable[[Request], Awaitable[None]]) -> None:
    """What the worker is and how it does (health, details), and its tokenizer (count, detokenize)."""
    settings, engine = service.settings, service.engine

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "draining" if service.draining else "ok" if service.ready else "loading",
            "worker_id": settings.worker_id,
            "model_names": settings.model_names,
            "served": service.served,
            "generated_tokens": service.generated_tokens,
            **service.status().model_dump(),
            "engine": {"name": engine.name, **dataclasses.asdict(engine.stats())},
        }

    @app.get("/model_details")
    async def model_details() -> dict:
        return {
            "model_names": settings.model_names,
            "kind": engine.kind,
            "engine": engine.name,
            "context_length": engine.context_length,
        }

    @app.post("/count_tokens", dependencies=[Depends(require_token)])
    async def count_tokens(req: CountTokensRequest) -> dict:
        ids = await service.on_text_thread(service.prompt_ids, req)
        reply: dict[str, Any] = {"count": len(ids), "context_length": engine.context_length}
        if req.return_tokens:
            reply["tokens"] = ids
            reply["token_strs"] = await service.on_text_thread(engine.token_strs, ids)
        return reply

    @app.post("/detokenize", dependencies=[Depends(require_token)])
    async def detokenize(req: DetokenizeRequest) -> dict:
        return {"prompt": await service.on_text_thread(engine.decode, req.tokens)}


def _endpoint(path: str) -> str | None:
    return path if path in ("/generate", "/embeddings") else None


def _register_worker_gauges(service: WorkerService) -> None:
    """Live figures read at scrape time: queue, and what the engine knows (batch, KV and prefix cache)."""
    registry = service.metrics.registry
    model = service.settings.model_names[0]

    def queued():
        return [([model], float(service.admission.waiting))]

    def engine_figure(attr: str):
        def read():
            value = getattr(service.engine.stats(), attr, None)
            return [] if value is None else [([model], float(value))]

        return read

    registry.register(
        gauge_collector("llmstack_worker_requests_queued", "Requests waiting for a slot.", ["model"], queued)
    )
    registry.register(
        gauge_collector(
            "llmstack_worker_batch_size", "Sequences in the current batch.", ["model"], engine_figure("batch_size")
        )
    )
    registry.register(
        gauge_collector(
            "llmstack_worker_kv_cache_usage_ratio",
            "Fraction of the KV cache in use.",
            ["model"],
            engine_figure("kv_cache_usage"),
        )
    )
    registry.register(
        gauge_collector(
            "llmstack_worker_generation_tokens_per_second",
            "Recent decode speed.",
            ["model"],
            engine_figure("tokens_per_s"),
        )
    )
    registry.register(
        counter_collector(
            "llmstack_worker_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the engine's prefix cache.",
            ["model"],
            engine_figure("prefix_cache_queried_tokens"),
        )
    )
    registry.register(
        counter_collector(
            "llmstack_worker_prefix_cache_hit_tokens",
            "Prompt tokens served from the engine's prefix cache.",
            ["model"],
            engine_figure("prefix_cache_hit_tokens"),
        )
    )
    registry.register(
        gauge_collector(
            "llmstack_worker_prefix_cache_hit_ratio",
            "Prompt tokens served from the prefix cache / tokens looked up, since start.",
            ["model"],
            engine_figure("prefix_cache_hit_rate"),
        )
    )
