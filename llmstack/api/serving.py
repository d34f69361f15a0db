"""The work behind each /v1 endpoint: one hop to a worker, failover before the first token, and
OpenAI-shaped responses and SSE chunks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson

from ..errors import LLMStackError, ServiceUnavailable, WorkerError
from ..metrics import RequestTracker
from ..service import REQUEST_ID_HEADER, request_id_var
from ..wire import EmbedReply, SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .routing import Route, RoutingTable

log = logging.getLogger("llmstack.api")

_RETRYABLE_STATUS = {429, 502, 503}


# Characters JSON leaves unescaped that str.splitlines() (and so httpx's iter_lines and many hand-written
# SSE readers) treat as line breaks.  In UTF-8 these byte sequences only ever encode those characters.
_LINE_BREAKERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _sse(obj: dict[str, Any]) -> bytes:
    data = orjson.dumps(obj)  # compact UTF-8, as json.dumps(ensure_ascii=False)
    if b"\xc2\x85" in data or b"\xe2\x80" in data:  # escaped: an SSE line must stay one line for any reader
        for raw, escaped in _LINE_BREAKERS:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


_DONE = b"data: [DONE]\n\n"


# the worker answers headers at once; only queueing and generation may take long
_STREAM_HTTP_TIMEOUT = httpx.Timeout(connect=3.0, read=None, write=30.0, pool=30.0)


class _Lost(Exception):
    """The connection to the worker broke in a way the HTTP client did not type (it can leak e.g. an
    AttributeError when a peer dies during connection setup): handled like a transport error."""


class _Silent(_Lost):
    """The worker sent nothing for `stream_timeout` seconds (and, before its first event, is not alive)."""


class WorkerStream:
    """Events from one generation on some worker.  Until the first event arrives, a worker that cannot
    be reached, is overloaded, breaks off or stops answering is replaced by another one of the same model.

    Timeouts: a worker that has started streaming must send its next event within `stream_timeout`
    seconds, or the stream ends with an error event; before its first event it may stay silent longer
    (the request may be queued) as long as its `/health` answers every `stream_timeout` seconds.  The whole
    request must finish within `request_timeout` seconds."""

    def __init__(
        self,
        router: RoutingTable,
        client: httpx.AsyncClient,
        max_attempts: int = 3,
        *,
        stream_timeout: float = 60.0,
        request_timeout: float = 600.0,
    ) -> None:
        self.router = router
        self.client = client
        self.max_attempts = max_attempts
        self.stream_timeout = stream_timeout
        self.request_timeout = request_timeout

    def _headers(self) -> dict[str, str]:
        return {REQUEST_ID_HEADER: request_id_var.get(), **self.router.headers}

    async def _next_lines(
        self, batches: AsyncIterator[list[bytes]], route: Route, started: bool, deadline: float
    ) -> list[bytes]:
        """The next lines from the worker, or `_Silent` / a timeout error when they do not come in time."""
        if started:  # a silent worker fails the stream: the read can simply be cancelled on timeout
            left = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(min(self.stream_timeout, left), 0)):
                    return await anext(batches)
            except TimeoutError:
                if left <= self.stream_timeout:
                    raise WorkerError(
                        f"the request took longer than the server's request timeout ({self.request_timeout:g}s)",
                        code="timeout",
                    ) from None
                raise _Silent(f"no output for {self.stream_timeout:g}s") from None
        # before the first event the request may be queued: wait on while the worker's /health answers
        next_line = asyncio.ensure_future(anext(batches))
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerError(
                        f"the request took longer than the server's request timeout ({self.request_timeout:g}s)",
                        code="timeout",
                    )
                done, _ = await asyncio.wait({next_line}, timeout=min(self.stream_timeout, left))
                if done:
                    return next_line.result()
                if left <= self.stream_timeout:
                    continue  # the deadline check above reports it
                if started or not await self.router.healthy(route.address, timeout=min(self.stream_timeout, 2.0)):
                    raise _Silent(f"no output for {self.stream_timeout:g}s")
        finally:
            if not next_line.done():
                # let the read finish cancelling (httpcore then closes the connection, which tells the
                # worker to stop) even when this task is being cancelled itself
                next_line.cancel()
                with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                    await next_line

    async def events(self, model: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        tried: set[str] = set()
        last_error: LLMStackError | None = None
        headers = self._headers()
        deadline = time.monotonic() + self.request_timeout
        for _ in range(self.max_attempts):
            try:
                route = self.router.pick(model, tried)
            except ServiceUnavailable:
                if last_error is not None:
                    raise last_error from None
                raise
            tried.add(route.address)
            route.inflight += 1
            started = False
            try:
                request = self.client.build_request(
                    "POST", f"{route.address}/generate", json=body, headers=headers, timeout=_STREAM_HTTP_TIMEOUT
                )
                try:
                    async with asyncio.timeout(min(self.stream_timeout, max(deadline - time.monotonic(), 0.01))):
                        response = await self.client.send(request, stream=True)
                except TimeoutError:
                    raise _Silent(f"no response headers within {self.stream_timeout:g}s") from None
                except (httpx.TransportError, LLMStackError):
                    raise
                except Exception as exc:
                    raise _Lost(f"{type(exc).__name__}: {exc}") from exc
                try:
                    if response.status_code != 200:
                        error = _error_from(await response.aread(), response.status_code)
                        if response.status_code in _RETRYABLE_STATUS:
                            self.router.count_failover(model, "overloaded")
                            last_error = error
                            continue
                        raise error
                    batches = _ndjson_batches(response)
                    while True:
                        try:
                            lines = await self._next_lines(batches, route, started, deadline)
                        except StopAsyncIteration:
                            break
                        except (httpx.TransportError, LLMStackError, _Lost):
                            raise
                        except Exception as exc:
                            raise _Lost(f"{type(exc).__name__}: {exc}") from exc
                        for event in _merge_text_events([orjson.loads(line) for line in lines if line]):
                            started = True
                            yield event
                    self.router.mark_ok(route)
                    return
                finally:
                    await response.aclose()
            except (httpx.TransportError, orjson.JSONDecodeError, _Lost) as exc:
                self.router.mark_failed(route, type(exc).__name__)
                if started:
                    what = "stopped answering" if isinstance(exc, _Silent) else "failed"
                    raise WorkerError(
                        f"the worker serving '{model}' {what} during generation; try again", code="worker_failed"
                    ) from exc
                self.router.count_failover(model, "unreachable")
                last_error = ServiceUnavailable(f"the worker for '{model}' could not be reached")
            finally:
                route.inflight -= 1
        raise last_error or ServiceUnavailable(f"no worker could serve '{model}'")

    async def post(self, model: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        tried: set[str] = set()
        last_error: LLMStackError | None = None
        headers = self._headers()
        for _ in range(self.max_attempts):
            try:
                route: Route = self.router.pick(model, tried)
            except ServiceUnavailable:
                if last_error is not None:
                    raise last_error from None
                raise
            tried.add(route.address)
            route.inflight += 1
            try:
                response = await self.client.post(f"{route.address}{path}", json=body, headers=headers)
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:  # not retried: the work may be under way
                self.router.mark_failed(route, type(exc).__name__)
                raise WorkerError(f"the worker for '{model}' did not answer in time", code="timeout") from exc
            except (httpx.TransportError, AttributeError, OSError) as exc:  # see `_Lost`
                self.router.mark_failed(route, type(exc).__name__)
                self.router.count_failover(model, "unreachable")
                last_error = ServiceUnavailable(f"the worker for '{model}' could not be reached")
                continue
            finally:
                route.inflight -= 1
            if response.status_code == 200:
                return response.json()
            error = _error_from(response.content, response.status_code)
            if response.status_code not in _RETRYABLE_STATUS:
                raise error
            self.router.count_failover(model, "overloaded")
            last_error = error
        raise last_error or ServiceUnavailable(f"no worker could serve '{model}'")


async def _ndjson_batches(response: httpx.Response) -> AsyncIterator[list[bytes]]:
    """The complete lines of each read, split on b"\\n" only: httpx's aiter_lines also splits on U+2028,
    U+0085 and friends, which JSON text carries unescaped."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if lines:
            yield lines
    if buffer:
        yield [buffer]


def _merge_text_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive text events of one choice that arrived together become one (text joined, tokens
    summed, logprobs concatenated, the last one's finish reason): when the reader is behind, it sends one
    chunk for them, not one each.  Nothing waits for more: only what one read brought is merged.  Events
    with tool-call deltas stay as they are."""
    if len(events) < 2:
        return events
    merged: list[dict[str, Any]] = []
    for event in events:
        last = merged[-1] if merged else None
        if (
            last is not None
            and "text" in event
            and "text" in last
            and last["index"] == event["index"]
            and not last.get("finish_reason")
            and "tool_calls" not in last
            and "tool_calls" not in event
            and ("logprobs" in last) == ("logprobs" in event)
        ):
            last["text"] += event["text"]
            last["tokens"] += event["tokens"]
            if "logprobs" in event:
                last["logprobs"] = last["logprobs"] + event["logprobs"]
            if event.get("finish_reason"):
                last["finish_reason"] = event["finish_reason"]
        else:
            merged.append(event)
    return merged


def _error_from(content: bytes, status: int) -> LLMStackError:
    try:
        return LLMStackError.from_body(orjson.loads(content), status)
    except (ValueError, AttributeError):
        return WorkerError(f"worker answered HTTP {status}")


class Completions:
    """Chat and text completions over the worker stream."""

    def __init__(self, workers: WorkerStream) -> None:
        self.workers = workers

    # -- chat -------------------------------------------------------------------------------------------------
    @staticmethod
    def _chat_body(req: ChatCompletionRequest, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": req.model, "messages": req.template_messages(), "params": params.model_dump()}
        tools = req.tool_spec()
        if tools is not None:
            body["tools"] = tools.model_dump()
        return body

    async def chat(self, req: ChatCompletionRequest, tracker: RequestTracker) -> dict[str, Any]:
        params = req.to_sampling_params()
        choices, usage = await _collect(self.workers.events(req.model, self._chat_body(req, params)), params.n, tracker)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "message": choice.message(),
                    "logprobs": {"content": choice.logprobs or [], "refusal": None} if req.logprobs else None,
                    "finish_reason": choice.finish,
                }
                for i, choice in enumerate(choices)
            ],
            "usage": _usage(usage),
        }

    async def chat_stream(self, req: ChatCompletionRequest, tracker: RequestTracker) -> AsyncIterator[bytes]:
        params = req.to_sampling_params()
        events = self.workers.events(req.model, self._chat_body(req, params))
        first = await _first_event(events)  # errors before the first token become an HTTP error
        return self._chat_sse(req, params, first, events, tracker)

    async def _chat_sse(
        self,
        req: ChatCompletionRequest,
        params: SamplingParams,
        first: dict[str, Any] | None,
        events: Any,
        tracker: RequestTracker,
    ) -> AsyncIterator[bytes]:
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": None,
        }
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            lp = {"content": logprobs, "refusal": None} if logprobs is not None else None
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return _sse({**base, "choices": [choice], **usage_field})

        for i in range(params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        source = _chain(first, events)
        try:
            async for event in source:
                if "usage" in event:
                    tracker.usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
                    if req.include_usage:
                        yield _sse({**base, "choices": [], "usage": _usage(event["usage"])})
                elif "error" in event:
                    tracker.failed(LLMStackError.from_body(event).status_code)
                    yield _sse(event)
                    break
                else:
                    delta: dict[str, Any] = {}
                    if event["text"]:
                        delta["content"] = event["text"]
                    if "tool_calls" in event:
                        delta["tool_calls"] = event["tool_calls"]
                    logprobs = event.get("logprobs")
                    if delta or logprobs:
                        tracker.first_token()
                        yield chunk(event["index"], delta, None, logprobs)
                    if event.get("finish_reason"):
                        yield chunk(event["index"], {}, event["finish_reason"])
        finally:
            # closed here, not at garbage collection: when the client leaves while a chunk is being sent,
            # this ends the worker stream (and so the generation) at once
            await source.aclose()
        yield _DONE

    # -- completions ----------------------------------------------------------------------------------------
    def _completion_bodies(self, req: CompletionRequest) -> list[dict[str, Any]]:
        params = req.to_sampling_params().model_dump()
        return [{"model": req.model, "prompt": p, "params": params, "echo": req.echo} for p in req.prompts]

    async def complete(self, req: CompletionRequest, tracker: RequestTracker) -> dict[str, Any]:
        n = req.n
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        for p_index, body in enumerate(self._completion_bodies(req)):
            collected, usage = await _collect(self.workers.events(req.model, body), n, tracker)
            prompt_tokens += usage["prompt_tokens"]
            completion_tokens += usage["completion_tokens"]
            for i, choice in enumerate(collected):
                logprobs = _completion_logprobs(choice.logprobs or [], 0) if req.logprobs is not None else None
                choices.append(
                    {
                        "index": p_index * n + i,
                        "text": choice.text,
                        "logprobs": logprobs,
                        "finish_reason": choice.finish,
                    }
                )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}),
        }

    async def complete_stream(self, req: CompletionRequest, tracker: RequestTracker) -> AsyncIterator[bytes]:
        bodies = self._completion_bodies(req)
        streams = [self.workers.events(req.model, b) for b in bodies]
        first = await _first_event(streams[0])
        return self._completion_sse(req, first, streams, tracker)

    async def _completion_sse(
        self, req: CompletionRequest, first: Any, streams: list[Any], tracker: RequestTracker
    ) -> AsyncIterator[bytes]:
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": None,
        }
        usage_field = {"usage": None} if req.include_usage else {}
        totals = {"prompt_tokens": 0, "completion_tokens": 0}
        offsets: dict[int, int] = {}  # text offset per choice, for logprobs
        sources = [_chain(first, streams[0]), *streams[1:]]
        try:
            for p_index, source in enumerate(sources):
                try:
                    async for event in source:
                        if "usage" in event:
                            totals["prompt_tokens"] += event["usage"]["prompt_tokens"]
                            totals["completion_tokens"] += event["usage"]["completion_tokens"]
                            tracker.usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
                        elif "error" in event:
                            tracker.failed(LLMStackError.from_body(event).status_code)
                            yield _sse(event)
                            yield _DONE
                            return
                        elif event["text"] or event.get("finish_reason") or event.get("logprobs"):
                            if event["text"]:
                                tracker.first_token()
                            index = p_index * req.n + event["index"]
                            logprobs = None
                            if req.logprobs is not None:
                                logprobs = _completion_logprobs(event.get("logprobs") or [], offsets.get(index, 0))
                            offsets[index] = offsets.get(index, 0) + len(event["text"])
                            choice = {
                                "index": index,
                                "text": event["text"],
                                "logprobs": logprobs,
                                "finish_reason": event.get("finish_reason"),
                            }
                            yield _sse({**base, "choices": [choice], **usage_field})
                except LLMStackError as exc:
                    tracker.failed(exc.status_code)
                    yield _sse(exc.to_body(request_id_var.get()))
                    yield _DONE
                    return
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(totals)})
            yield _DONE
        finally:  # as in chat: end every worker stream now when the client leaves early
            for source in sources:
                await source.aclose()


async def _first_event(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    """Pull the first event so failures before any output surface as a proper HTTP error."""
    try:
        event = await anext(events)
    except StopAsyncIteration:
        return None
    if "error" in event:
        await events.aclose()
        raise LLMStackError.from_body(event)
    return event


async def _chain(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        if first is not None:
            yield first
        async for event in rest:
            yield event
    except LLMStackError as exc:  # the worker died mid-stream: end with a proper error event
        yield exc.to_body(request_id_var.get())
    finally:
        await rest.aclose()


class _Choice:
    """One choice put together from its stream events."""

    __slots__ = ("parts", "finish", "calls", "logprobs")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish = "stop"
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[dict[str, Any]] | None = None

    def add(self, event: dict[str, Any]) -> None:
        self.parts.append(event["text"])
        if event.get("finish_reason"):
            self.finish = event["finish_reason"]
        if "logprobs" in event:
            self.logprobs = (self.logprobs or []) + event["logprobs"]
        for delta in event.get("tool_calls", ()):
            call = self.calls.get(delta["index"])
            if call is None:
                self.calls[delta["index"]] = {
                    "id": delta.get("id", ""),
                    "type": "function",
                    "function": {"name": delta["function"].get("name", ""), "arguments": ""},
                }
                call = self.calls[delta["index"]]
            call["function"]["arguments"] += delta["function"].get("arguments", "")

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def message(self) -> dict[str, Any]:
        text = self.text
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text or (None if self.calls else ""),
            "refusal": None,
        }
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message


async def _collect(
    events: AsyncIterator[dict[str, Any]], n: int, tracker: RequestTracker
) -> tuple[list[_Choice], dict[str, int]]:
    choices = [_Choice() for _ in range(n)]
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    async for event in events:
        if "usage" in event:
            usage = event["usage"]
            tracker.usage(usage["prompt_tokens"], usage["completion_tokens"])
        elif "error" in event:
            raise LLMStackError.from_body(event)
        else:
            if event["text"] or "tool_calls" in event:
                tracker.first_token()
            choices[event["index"]].add(event)
    return choices, usage


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Chat-shaped logprob entries in the legacy completions shape."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry["token"])
        values.append(entry["logprob"])
        alternatives = entry.get("top_logprobs") or []
        tops.append({a["token"]: a["logprob"] for a in alternatives} if entry["logprob"] is not None else None)
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _usage(usage: dict[str, int]) -> dict[str, int]:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
    }


class Embeddings:
    def __init__(self, workers: WorkerStream) -> None:
        self.workers = workers

    async def create(self, req: EmbeddingRequest, tracker: RequestTracker) -> dict[str, Any]:
        reply = EmbedReply.model_validate(await self.workers.post(req.model, "/embeddings", {"input": req.inputs}))
        tracker.usage(reply.prompt_tokens, 0)
        dims = len(reply.embeddings[0]) if reply.embeddings else 0
        if req.dimensions is not None and req.dimensions != dims:
            raise LLMStackError.from_body(
                {
                    "error": {
                        "type": "invalid_request_error",
                        "message": f"this model only returns {dims} dimensions",
                        "param": "dimensions",
                    }
                }
            )
        data = []
        for i, vector in enumerate(reply.embeddings):
            value: Any = vector
            if req.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
        }
