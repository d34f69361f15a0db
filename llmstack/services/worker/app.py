"""The model worker: one engine behind a small HTTP API, registered with a controller.

Routes: `POST /generate` (NDJSON stream of deltas), `POST /embeddings`, `POST /count_tokens` (also
tokenises), `POST /detokenize`, `GET /model_details`, `GET /health`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from llmstack.common.errors import ContextLengthExceeded, InvalidRequest, LLMStackError, Overloaded, ServiceUnavailable
from llmstack.common.http import check_bearer, install_error_handlers, is_loopback
from llmstack.common.metrics import (
    MetricsMiddleware,
    RequestTracker,
    ServingMetrics,
    counter_collector,
    gauge_collector,
)
from llmstack.common.wire import (
    CountTokensRequest,
    DetokenizeRequest,
    EmbedReply,
    EmbedRequest,
    GenerateRequest,
    Heartbeat,
    SamplingParams,
    ToolSpec,
    Unregister,
    WorkerRegistration,
    WorkerStatus,
)
from llmstack.services.engines.base import Engine
from llmstack.services.worker.admission import Admission
from llmstack.services.worker.reasoning import ThinkReader
from llmstack.services.worker.reasoning import reader_for as thinker_for
from llmstack.services.worker.toolcalls import ToolCallReader, forced_structure, reader_for

log = logging.getLogger("llmstack.worker")


@dataclass
class WorkerSettings:
    worker_address: str
    model_names: list[str]
    controller_address: str | None = "http://127.0.0.1:21001"
    register: bool = True
    limit_worker_concurrency: int = 5
    max_queue: int = 256
    heartbeat_interval: float = 3.0
    cluster_token: str | None = None
    embed_in_truncate: bool = False
    tool_parser: str = "hermes"  # how tool calls are read from the model's text (toolcalls.PARSERS)
    reasoning_parser: str | None = None  # how reasoning is read from it (reasoning.PARSERS); None: not at all
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class WorkerService:
    """The worker's state: engine, admission, controller link.  Lives on `app.state.worker`."""

    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = ServingMetrics("worker")
        self.admission = Admission(settings.limit_worker_concurrency, settings.max_queue)
        self.ready = False
        self.draining = False
        self.client: httpx.AsyncClient | None = None
        self.link: asyncio.Task[None] | None = None
        self.served = 0  # requests answered, and tokens generated: cheap counters for /health
        self.generated_tokens = 0

    # -- status ---------------------------------------------------------------------------------------
    def status(self) -> WorkerStatus:
        stats = self.engine.stats()
        return WorkerStatus(
            queue_length=self.admission.waiting + self.admission.running,
            running=self.admission.running,
            speed=max(stats.tokens_per_s, 1.0) if stats.tokens_per_s else 1.0,
        )

    def registration(self) -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=self.settings.worker_id,
            worker_address=self.settings.worker_address,
            model_names=self.settings.model_names,
            kind=self.engine.kind,
            engine=self.engine.name,
            context_length=self.engine.context_length,
            capacity=self.settings.limit_worker_concurrency,
            status=self.status(),
        )

    # -- prompts --------------------------------------------------------------------------------------
    def prompt_ids(self, req: GenerateRequest | CountTokensRequest) -> list[int]:
        if req.messages is not None:
            spec = getattr(req, "tools", None)
            tools = spec.tools if spec is not None and spec.choice != "none" else None
            prompt = self.engine.render_chat(req.messages, tools, req.chat_template_kwargs)
            return self.engine.encode(prompt, add_special_tokens=False)
        if req.prompt is not None:
            special = getattr(req, "add_special_tokens", None)
            return self.engine.encode(req.prompt, True if special is None else special)
        raise InvalidRequest("either 'prompt' or 'messages' is required", param="prompt")

    def check_budget(self, prompt_len: int, params: SamplingParams) -> SamplingParams:
        ctx = self.engine.context_length
        if prompt_len == 0:  # nothing to condition on: engines cannot start a sequence from no tokens
            raise InvalidRequest("The prompt is empty; send at least some text.", param="prompt")
        if prompt_len >= ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens. However, your messages resulted in "
                f"{prompt_len} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        room = ctx - prompt_len
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the messages, {params.max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        stop = list(dict.fromkeys([*params.stop, *getattr(self.engine, "template_stop", [])]))
        update: dict[str, Any] = {"max_tokens": params.max_tokens or room, "stop": stop}
        if not params.ignore_eos:  # the template's end-of-turn tokens end a sequence as its eos does
            turn_ends = getattr(self.engine, "template_stop_ids", [])
            update["stop_token_ids"] = list(dict.fromkeys([*params.stop_token_ids, *turn_ends]))
        return params.model_copy(update=update)

    # -- generation -------------------------------------------------------------------------------------
    def prepare(self, req: GenerateRequest, prompt_len: int) -> SamplingParams:
        """The request's sampling settings, checked against the context and the engine, with the
        grammar that forces a tool call when the request asks for one."""
        params = self.check_budget(prompt_len, req.params)
        if req.tools is not None:
            structure = forced_structure(req.tools)
            if structure is not None:
                params = params.model_copy(update={"structure": structure})
        try:
            self.engine.check(params)
        except InvalidRequest as exc:
            if req.tools is not None and req.tools.choice in ("function", "required"):
                exc.param = "tools"
            raise
        return params

    def readers(self, spec: ToolSpec | None, n: int) -> list[ToolCallReader | None]:
        return [reader_for(spec, self.settings.tool_parser) if spec is not None else None for _ in range(n)]

    def thinkers(self, prompt_ids: list[int], params: SamplingParams, chat: bool) -> list[ThinkReader | None]:
        """Reasoning readers for a chat's choices (none for plain prompts, and none when a grammar
        decides the whole output: it leaves no room to think)."""
        parser = self.settings.reasoning_parser
        if not parser or not chat or params.structure is not None:
            return [None] * params.n
        tail = self.engine.decode(prompt_ids[-8:]) if parser == "qwen3" else ""
        return [thinker_for(parser, tail) for _ in range(params.n)]

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        echo_text: str | None,
        tracker: RequestTracker,
        tools: ToolSpec | None = None,
        chat: bool = False,
        *,
        priority: int = 0,
        report_prompt: bool = False,
    ) -> AsyncIterator[bytes]:
        """NDJSON events for all `n` choices, then the usage line; errors become an error line.  With
        `report_prompt`, the prompt's token count goes first, before the request waits for a slot."""
        if report_prompt:
            yield _line({"prompt_tokens": len(prompt_ids)})
        completion_tokens = reasoning_tokens = 0
        self.served += 1
        readers = self.readers(tools, params.n)
        thinkers = self.thinkers(prompt_ids, params, chat)
        # echo text goes first; with prompt logprobs it waits for them (they come with the first chunk)
        echo_waiting = set(range(params.n)) if echo_text is not None and params.prompt_logprobs is not None else set()
        try:
            async with self.admission.slot(priority):
                if echo_text is not None and not echo_waiting:
                    for i in range(params.n):
                        yield _line({"index": i, "text": echo_text, "tokens": 0})
                source = self._single(prompt_ids, params) if params.n == 1 else self._fan_out(prompt_ids, params)
                async with aclosing(source) as chunks:  # closed at once when the client leaves: aborts
                    async for index, chunk in chunks:
                        if index in echo_waiting:
                            echo_waiting.discard(index)
                            yield _line(_echo_event(index, echo_text or "", chunk))
                        tracker.first_token()
                        completion_tokens += chunk.tokens
                        self.generated_tokens += chunk.tokens
                        thinker = thinkers[index]
                        event = _event(index, chunk, readers[index], thinker)
                        if thinker is not None and (thinker.thinking or ("reasoning" in event and not event["text"])):
                            reasoning_tokens += chunk.tokens  # still thinking, or the chunk that ended it
                        yield _line(event)
            tracker.usage(len(prompt_ids), completion_tokens)
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens}
            if any(thinkers):
                usage["reasoning_tokens"] = reasoning_tokens
            yield _line({"usage": usage})
        except LLMStackError as exc:
            tracker.failed(exc.status_code)
            yield _line(exc.to_body())
        except Exception as exc:
            log.exception("generation failed")
            tracker.failed(500)
            yield _line(LLMStackError(f"generation failed: {type(exc).__name__}: {exc}").to_body())

    async def _single(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[tuple[int, Any]]:
        async with aclosing(self.engine.generate(prompt_ids, params)) as chunks:
            async for chunk in chunks:
                yield 0, chunk

    async def _fan_out(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[tuple[int, Any]]:
        """`n` choices as independent sequences (seed + i keeps them distinct yet reproducible)."""
        merged: asyncio.Queue[tuple[int, Any] | BaseException | None] = asyncio.Queue()

        async def pump(i: int) -> None:
            seed = None if params.seed is None else params.seed + i
            try:
                async for chunk in self.engine.generate(prompt_ids, params.model_copy(update={"seed": seed, "n": 1})):
                    await merged.put((i, chunk))
            except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
                await merged.put(exc)
            finally:
                await merged.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(params.n)]
        try:
            done = 0
            while done < params.n:
                item = await merged.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    # -- controller link ----------------------------------------------------------------------------------
    async def controller_loop(self, client: httpx.AsyncClient) -> None:
        """Register (retrying until the controller answers), then heartbeat; re-register whenever the
        controller has forgotten us (it restarted, or expired us during a pause)."""
        base = self.settings.controller_address
        assert base
        registered = False
        backoff = 0.5
        while True:
            try:
                if not registered:
                    resp = await client.post(f"{base}/workers/register", json=self.registration().model_dump())
                    if resp.status_code == 409:  # we are known already: just heartbeat
                        registered = True
                    elif resp.status_code in (401, 403):
                        log.error("controller refused registration (%s): check the cluster token", resp.status_code)
                        await asyncio.sleep(min(backoff, 10))
                        backoff *= 2
                        continue
                    else:
                        resp.raise_for_status()
                        registered = True
                        log.info("registered with controller %s as %s", base, self.settings.worker_address)
                    backoff = 0.5
                else:
                    beat = Heartbeat(
                        worker_id=self.settings.worker_id,
                        worker_address=self.settings.worker_address,
                        status=self.status(),
                    )
                    resp = await client.post(f"{base}/workers/heartbeat", json=beat.model_dump())
                    resp.raise_for_status()
                    if not resp.json().get("known", False):
                        log.warning("controller does not know this worker any more; registering again")
                        registered = False
                        continue
                await asyncio.sleep(self.settings.heartbeat_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # controller down or restarting: keep trying, keep serving
                log.warning("controller %s unreachable (%s); retrying in %.1fs", base, type(exc).__name__, backoff)
                registered = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.heartbeat_interval)

    async def begin_drain(self) -> None:
        """On SIGTERM, before the server drains: refuse new work and leave the controller's table, so
        routing moves away while the requests under way finish."""
        if self.draining:
            return
        self.draining = True
        log.info("stopping: unregistering, then finishing %d request(s) under way", self.admission.running)
        if self.link is not None:
            self.link.cancel()
            self.link = None
            if self.client is not None:
                await self.unregister(self.client)

    async def unregister(self, client: httpx.AsyncClient) -> None:
        base = self.settings.controller_address
        body = Unregister(worker_id=self.settings.worker_id, worker_address=self.settings.worker_address)
        try:
            await client.post(f"{base}/workers/unregister", json=body.model_dump(), timeout=2)
        except Exception as exc:
            log.warning("could not unregister from controller: %s", exc)


def _event(
    index: int, chunk: Any, reader: ToolCallReader | None = None, thinker: ThinkReader | None = None
) -> dict[str, Any]:
    text, finish = chunk.text, chunk.finish_reason
    reasoning = ""
    if thinker is not None:  # reasoning first: tool calls are read from the answer only
        reasoning, text = thinker.feed(text)
        if finish is not None:
            more_reasoning, more_text = thinker.finish()
            reasoning, text = reasoning + more_reasoning, text + more_text
    calls: list[dict[str, Any]] = []
    if reader is not None:
        text, calls = reader.feed(text)
        if finish is not None:
            tail, more, finish = reader.finish(finish)
            text += tail
            calls += more
    event: dict[str, Any] = {"index": index, "text": text, "tokens": chunk.tokens}
    if reasoning:
        event["reasoning"] = reasoning
    if finish is not None:
        event["finish_reason"] = finish
        if chunk.stop_sequence is not None:
            event["stop_sequence"] = chunk.stop_sequence
    if chunk.logprobs is not None:
        event["logprobs"] = chunk.logprobs
    if calls:
        event["tool_calls"] = calls
    return event


def _echo_event(index: int, text: str, chunk: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"index": index, "text": text, "tokens": 0}
    if chunk.prompt_logprobs is not None:
        event["logprobs"] = chunk.prompt_logprobs
    return event


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)  # compact UTF-8, as json.dumps(ensure_ascii=False)


def build_worker_app(settings: WorkerSettings, engine: Engine) -> FastAPI:
    service = WorkerService(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        service.ready = True
        headers = {"Authorization": f"Bearer {settings.cluster_token}"} if settings.cluster_token else {}
        client = service.client = httpx.AsyncClient(timeout=5.0, headers=headers)
        if settings.register and settings.controller_address:
            service.link = asyncio.create_task(service.controller_loop(client))
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
                service.link.cancel()
                await service.unregister(client)
            await client.aclose()
            await engine.close()

    app = FastAPI(title="llmstack worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = service
    app.state.before_drain = service.begin_drain  # `service.serve` calls it on SIGTERM
    install_error_handlers(app)
    metrics = service.metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=_endpoint)
    _register_worker_gauges(service)

    def track(request: Request, model: str | None) -> RequestTracker:
        names = settings.model_names
        tracker = metrics.track(model if model in names else names[0])
        request.state.tracker = tracker
        return tracker

    tokens = [settings.cluster_token] if settings.cluster_token else []

    async def require_token(request: Request) -> None:  # async: a plain def would run in the thread pool
        check_bearer(request, tokens, what="cluster token")

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
        ids = service.prompt_ids(req)
        reply: dict[str, Any] = {"count": len(ids), "context_length": engine.context_length}
        if req.return_tokens:
            reply["tokens"] = ids
            reply["token_strs"] = engine.token_strs(ids)
        return reply

    @app.post("/detokenize", dependencies=[Depends(require_token)])
    async def detokenize(req: DetokenizeRequest) -> dict:
        return {"prompt": engine.decode(req.tokens)}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint():  # noqa: ANN202
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
        prompt_ids = service.prompt_ids(req)
        params = service.prepare(req, len(prompt_ids))
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

    return app


def _endpoint(path: str) -> str | None:
    return path if path in ("/generate", "/embeddings") else None


def _register_worker_gauges(service: WorkerService) -> None:
    """Live figures read at scrape time: queue, and what the engine knows (batch, KV and prefix cache)."""
    registry = service.metrics.registry
    model = service.settings.model_names[0]

    def queued():  # noqa: ANN202
        return [([model], float(service.admission.waiting))]

    def engine_figure(attr: str):  # noqa: ANN202
        def read():  # noqa: ANN202
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
