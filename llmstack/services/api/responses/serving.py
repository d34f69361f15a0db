"""`/v1/responses`: a conversation (input items, and the stored one it continues) to a worker, the
Responses API's response object or its event stream; stored responses read back and deleted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llmstack.common.errors import LLMStackError, NotFound
from llmstack.common.metrics import RequestTracker
from llmstack.services.api.chat import worker_chat_body
from llmstack.services.api.responses.builder import Event, ResponseBuilder
from llmstack.services.api.responses.items import Item, dump_items, parse_items, to_messages
from llmstack.services.api.responses.protocol import ResponsesRequest
from llmstack.services.api.responses.store import ResponseStore, Stored
from llmstack.services.api.streaming import chain, first_event, sse_event
from llmstack.services.api.upstream import WorkerStream


def _input_param(exc: LLMStackError) -> LLMStackError:
    """The worker names the chat it rendered (`messages`); here that is the request's `input`."""
    if exc.param == "messages":
        exc.param = "input"
    return exc


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"No response found with id '{response_id}'.", param="response_id", code="response_not_found")


class Responses:
    """Responses over the worker stream, stored in `store` when asked to."""

    def __init__(self, workers: WorkerStream, store: ResponseStore) -> None:
        self.workers = workers
        self.store = store

    async def _conversation(self, req: ResponsesRequest, owner: str) -> tuple[list[Item], int]:
        """Every item of the conversation: the stored one `previous_response_id` continues, then the input."""
        if req.previous_response_id is None:
            return req.items, 0
        previous = await self.store.load(req.previous_response_id, owner)
        if previous is None:
            raise NotFound(
                f"Previous response with id '{req.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = parse_items(previous.conversation, at="previous_response")
        return history + req.items, len(history)

    async def _events(self, req: ResponsesRequest, owner: str) -> tuple[AsyncIterator[dict[str, Any]], list[Item]]:
        items, first_input = await self._conversation(req, owner)
        messages = to_messages(req.instructions, items, first_input)
        body = worker_chat_body(req, messages, req.to_sampling_params())
        return self.workers.events(req.model, body), items

    @staticmethod
    def _track(event: dict[str, Any], tracker: RequestTracker) -> None:
        if "usage" in event:
            tracker.usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
        elif event.get("text") or event.get("reasoning") or event.get("tool_calls"):
            tracker.first_token()

    async def _keep(self, req: ResponsesRequest, builder: ResponseBuilder, items: list[Item], owner: str) -> None:
        if req.store:
            conversation = dump_items(items) + [dict(item) for item in builder.output]
            record = Stored(builder.id, owner, builder.created_at, builder.response(), conversation)
            await self.store.save(record)

    async def create(self, req: ResponsesRequest, tracker: RequestTracker, owner: str) -> dict[str, Any]:
        events, items = await self._events(req, owner)
        builder = ResponseBuilder(req)
        builder.start()
        try:
            async for event in events:
                if "error" in event:
                    raise LLMStackError.from_body(event)
                self._track(event, tracker)
                builder.feed(event)
        except LLMStackError as exc:
            raise _input_param(exc) from None
        builder.finish()
        await self._keep(req, builder, items, owner)
        return builder.response()

    async def create_stream(self, req: ResponsesRequest, tracker: RequestTracker, owner: str) -> AsyncIterator[bytes]:
        events, items = await self._events(req, owner)
        try:
            first = await first_event(events)  # errors before the first token become an HTTP error
        except LLMStackError as exc:
            raise _input_param(exc) from None
        return self._stream(req, first, events, items, tracker, owner)

    async def _stream(
        self,
        req: ResponsesRequest,
        first: dict[str, Any] | None,
        events: AsyncIterator[dict[str, Any]],
        items: list[Item],
        tracker: RequestTracker,
        owner: str,
    ) -> AsyncIterator[bytes]:
        builder = ResponseBuilder(req)
        for event in builder.start():
            yield sse_event(event)
        source = chain(first, events)
        try:
            async for worker_event in source:
                out: list[Event]
                if "error" in worker_event:
                    error = LLMStackError.from_body(worker_event)
                    tracker.failed(error.status_code)
                    out = builder.fail(error)
                else:
                    self._track(worker_event, tracker)
                    out = builder.feed(worker_event)
                for event in out:
                    yield sse_event(event)
                if builder.status == "failed":
                    return
            out = builder.finish()
            await self._keep(req, builder, items, owner)  # before the last event: a next turn may follow at once
            for event in out:
                yield sse_event(event)
        finally:
            await source.aclose()  # ends the worker stream at once when the client leaves

    async def get(self, response_id: str, owner: str) -> dict[str, Any]:
        record = await self.store.load(response_id, owner)
        if record is None:
            raise _not_found(response_id)
        return record.response

    async def delete(self, response_id: str, owner: str) -> dict[str, Any]:
        if not await self.store.delete(response_id, owner):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}
