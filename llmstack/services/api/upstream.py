"""The API server's side of the one hop: events from one generation on some worker, and plain posts,
with failover to another worker of the same model until the first event arrives."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any, Protocol, cast

import anyio
import httpx
import orjson

from llmstack.common.errors import LLMStackError, ServiceUnavailable, WorkerError
from llmstack.common.http import REQUEST_ID_HEADER, request_id_var
from llmstack.common.wire import StreamEvent, TextEvent
from llmstack.services.api.routing import Route, RoutingTable

_RETRYABLE_STATUS = {429, 502, 503}


# the worker answers headers at once; only queueing and generation may take long
_STREAM_HTTP_TIMEOUT = httpx.Timeout(connect=3.0, read=None, write=30.0, pool=30.0)


class Meter(Protocol):
    """Who pays for a request (an API key's grant): told what the worker reports as it happens."""

    def worker_fields(self) -> dict[str, Any]:
        """Extra fields for the worker's request body (priority, asking for the prompt's token count)."""
        ...

    def prompt(self, tokens: int) -> None:
        """The prompt's token count, before generation; may raise (a rate limit) to refuse the request."""
        ...

    def generated(self, tokens: int) -> None: ...

    async def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """A stream's (or a post's) final counts; awaited before they are passed on to the client."""
        ...


#: The meter of the request being served (set when its key admits it); None: nobody meters it.
current_meter: ContextVar[Meter | None] = ContextVar("current_meter", default=None)


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

    def _pick(self, model: str, tried: set[str], last_error: LLMStackError | None) -> Route:
        """The next worker to try (counted in flight; the caller decrements), or the last attempt's error
        when none is left."""
        try:
            route = self.router.pick(model, tried)
        except ServiceUnavailable:
            if last_error is not None:
                raise last_error from None
            raise
        tried.add(route.address)
        route.inflight += 1
        return route

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

    async def events(self, model: str, body: dict[str, Any]) -> AsyncIterator[StreamEvent]:
        tried: set[str] = set()
        last_error: LLMStackError | None = None
        headers = self._headers()
        deadline = time.monotonic() + self.request_timeout
        meter = current_meter.get()
        if meter is not None and meter.worker_fields():
            body = {**body, **meter.worker_fields()}
        prompted = False  # a retry on another worker reports the prompt again: it is counted once
        for _ in range(self.max_attempts):
            route = self._pick(model, tried, last_error)
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
                        parsed = [cast(StreamEvent, orjson.loads(line)) for line in lines if line]
                        for event in _merge_text_events(parsed):
                            if "prompt_tokens" in event:  # counted before generation; not the stream's start
                                if meter is not None and not prompted:
                                    meter.prompt(event["prompt_tokens"])
                                prompted = True
                                continue
                            started = True
                            if meter is not None:
                                await _report(meter, event)
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
            route = self._pick(model, tried, last_error)
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
                reply = response.json()
                meter = current_meter.get()
                if meter is not None and isinstance(reply.get("prompt_tokens"), int):  # embeddings
                    await meter.usage(reply["prompt_tokens"], 0)
                return reply
            error = _error_from(response.content, response.status_code)
            if response.status_code not in _RETRYABLE_STATUS:
                raise error
            self.router.count_failover(model, "overloaded")
            last_error = error
        raise last_error or ServiceUnavailable(f"no worker could serve '{model}'")


async def _report(meter: Meter, event: dict[str, Any]) -> None:
    if "usage" in event:
        await meter.usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
    elif "tokens" in event:
        meter.generated(event["tokens"])


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


def _merge_text_events(events: list[StreamEvent]) -> list[StreamEvent]:
    """Consecutive text events of one choice that arrived together become one (text joined, tokens
    summed, logprobs concatenated, the last one's finish reason): when the reader is behind, it sends one
    chunk for them, not one each.  Nothing waits for more: only what one read brought is merged.  Events
    with tool-call deltas stay as they are."""
    if len(events) < 2:
        return events
    merged: list[StreamEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if last is not None and "text" in event and "text" in last and _joinable(last, event):
            _join(last, event)
        else:
            merged.append(event)
    return merged


def _joinable(last: TextEvent, event: TextEvent) -> bool:
    return (
        last["index"] == event["index"]
        and not last.get("finish_reason")
        and "tool_calls" not in last
        and "tool_calls" not in event
        and ("logprobs" in last) == ("logprobs" in event)
        and not ("reasoning" in event and last["text"])  # reasoning after text: keep the order
    )


def _join(last: TextEvent, event: TextEvent) -> None:
    if "reasoning" in event:
        last["reasoning"] = last.get("reasoning", "") + event["reasoning"]
    last["text"] += event["text"]
    last["tokens"] += event["tokens"]
    if "logprobs" in event:
        last["logprobs"] = last["logprobs"] + event["logprobs"]
    if event.get("finish_reason"):
        last["finish_reason"] = event["finish_reason"]
        if "stop_sequence" in event:
            last["stop_sequence"] = event["stop_sequence"]


def _error_from(content: bytes, status: int) -> LLMStackError:
    try:
        return LLMStackError.from_body(orjson.loads(content), status)
    except (ValueError, AttributeError):
        return WorkerError(f"worker answered HTTP {status}")
