"""`/v1/messages` and `/v1/messages/count_tokens`: Anthropic Messages over the worker stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llmstack.common.errors import LLMStackError
from llmstack.common.metrics import RequestTracker
from llmstack.services.api.chat import template_inputs, worker_chat_body
from llmstack.services.api.messages.builder import MessageBuilder
from llmstack.services.api.messages.protocol import CountTokensRequest, MessagesRequest
from llmstack.services.api.streaming import chain, first_event, sse_event
from llmstack.services.api.upstream import WorkerStream


class Messages:
    def __init__(self, workers: WorkerStream) -> None:
        self.workers = workers

    @staticmethod
    def _body(req: MessagesRequest) -> dict[str, Any]:
        return worker_chat_body(req, req.template_messages, req.to_sampling_params())

    @staticmethod
    def _track(event: dict[str, Any], tracker: RequestTracker) -> None:
        if "usage" in event:
            tracker.usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
        elif event.get("text") or event.get("reasoning") or event.get("tool_calls"):
            tracker.first_token()

    async def create(self, req: MessagesRequest, tracker: RequestTracker) -> dict[str, Any]:
        builder = MessageBuilder(req)
        async for event in self.workers.events(req.model, self._body(req)):
            if "error" in event:
                raise LLMStackError.from_body(event)
            self._track(event, tracker)
            builder.feed(event)
        builder.finish()
        return builder.message()

    async def create_stream(self, req: MessagesRequest, tracker: RequestTracker) -> AsyncIterator[bytes]:
        events = self.workers.events(req.model, self._body(req))
        first = await first_event(events)  # errors before the first token become an HTTP error
        return self._stream(req, first, events, tracker)

    async def _stream(
        self,
        req: MessagesRequest,
        first: dict[str, Any] | None,
        events: AsyncIterator[dict[str, Any]],
        tracker: RequestTracker,
    ) -> AsyncIterator[bytes]:
        builder = MessageBuilder(req)
        for event in builder.start():
            yield sse_event(event)
        source = chain(first, events)
        try:
            async for worker_event in source:
                if "error" in worker_event:
                    error = LLMStackError.from_body(worker_event)
                    tracker.failed(error.status_code)
                    for event in builder.fail(error):
                        yield sse_event(event)
                    return
                self._track(worker_event, tracker)
                for event in builder.feed(worker_event):
                    yield sse_event(event)
            for event in builder.finish():
                yield sse_event(event)
        finally:
            await source.aclose()  # ends the worker stream at once when the client leaves

    async def count_tokens(self, req: CountTokensRequest) -> dict[str, Any]:
        body = {"messages": req.template_messages, **template_inputs(req)}
        reply = await self.workers.post(req.model, "/count_tokens", body)
        return {"input_tokens": reply["count"]}
