"""`/v1/chat/completions`: messages (and tools) to a worker, OpenAI's chat completion or its SSE chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from llmstack.common.errors import LLMStackError
from llmstack.common.metrics import RequestTracker
from llmstack.common.wire import SamplingParams, StreamEvent, ToolSpec
from llmstack.services.api.protocol import ChatCompletionRequest
from llmstack.services.api.streaming import (
    SSE_DONE,
    chain,
    collect,
    first_event,
    sse,
    usage_block,
)
from llmstack.services.api.upstream import WorkerStream


class ChatShaped(Protocol):
    """What a chat request of any API (Chat Completions, Responses, Messages) gives the worker."""

    model: str

    def tool_spec(self) -> ToolSpec | None: ...

    def template_kwargs(self) -> dict[str, Any] | None: ...


def template_inputs(req: ChatShaped) -> dict[str, Any]:
    """What the worker's chat template takes besides the messages: the tools and template kwargs, if any."""
    body: dict[str, Any] = {}
    tools = req.tool_spec()
    if tools is not None:
        body["tools"] = tools.model_dump()
    kwargs = req.template_kwargs()
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    return body


def worker_chat_body(req: ChatShaped, messages: list[dict[str, Any]], params: SamplingParams) -> dict[str, Any]:
    """The worker's /generate body for a chat, the same whichever API the request came in by."""
    return {"model": req.model, "messages": messages, "params": params.model_dump(), **template_inputs(req)}


class ChatCompletions:
    """Chat completions over the worker stream."""

    def __init__(self, workers: WorkerStream) -> None:
        self.workers = workers

    async def chat(self, req: ChatCompletionRequest, tracker: RequestTracker) -> dict[str, Any]:
        params = req.to_sampling_params()
        body = worker_chat_body(req, req.template_messages(), params)
        choices, usage = await collect(self.workers.events(req.model, body), params.n, tracker)
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
            "usage": usage_block(usage),
        }

    async def chat_stream(self, req: ChatCompletionRequest, tracker: RequestTracker) -> AsyncIterator[bytes]:
        params = req.to_sampling_params()
        events = self.workers.events(req.model, worker_chat_body(req, req.template_messages(), params))
        first = await first_event(events)  # errors before the first token become an HTTP error
        return self._chat_sse(req, params, first, events, tracker)

    async def _chat_sse(
        self,
        req: ChatCompletionRequest,
        params: SamplingParams,
        first: StreamEvent | None,
        events: AsyncIterator[StreamEvent],
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
            return sse({**base, "choices": [choice], **usage_field})

        for i in range(params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        source = chain(first, events)
        try:
            async for event in source:
                if "usage" in event:
                    tracker.usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
                    if req.include_usage:
                        yield sse({**base, "choices": [], "usage": usage_block(event["usage"])})
                elif "error" in event:
                    tracker.failed(LLMStackError.from_body(event).status_code)
                    yield sse(event)
                    break
                else:
                    delta: dict[str, Any] = {}
                    if "reasoning" in event:  # both names: clients read one or the other
                        delta["reasoning_content"] = delta["reasoning"] = event["reasoning"]
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
        yield SSE_DONE
