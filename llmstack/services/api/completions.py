"""`/v1/completions`: prompts to a worker (one stream per prompt), OpenAI's text completion or its SSE
chunks, logprobs in the legacy shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from llmstack.common.errors import LLMStackError
from llmstack.common.http import request_id_var
from llmstack.common.metrics import RequestTracker
from llmstack.common.wire import Usage
from llmstack.services.api.protocol import CompletionRequest
from llmstack.services.api.streaming import (
    SSE_DONE,
    add_usage,
    chain,
    collect,
    completion_logprobs,
    first_event,
    sse,
    usage_block,
)
from llmstack.services.api.upstream import WorkerStream


class TextCompletions:
    """Text completions over the worker stream."""

    def __init__(self, workers: WorkerStream) -> None:
        self.workers = workers

    def _completion_bodies(self, req: CompletionRequest) -> list[dict[str, Any]]:
        params = req.to_sampling_params().model_dump()
        return [{"model": req.model, "prompt": p, "params": params, "echo": req.echo} for p in req.prompts]

    async def complete(self, req: CompletionRequest, tracker: RequestTracker) -> dict[str, Any]:
        n = req.n
        choices: list[dict[str, Any]] = []
        totals: Usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for p_index, body in enumerate(self._completion_bodies(req)):
            collected, usage = await collect(self.workers.events(req.model, body), n, tracker)
            add_usage(totals, usage)
            for i, choice in enumerate(collected):
                logprobs = completion_logprobs(choice.logprobs or [], 0) if req.logprobs is not None else None
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
            "usage": usage_block(totals),
        }

    async def complete_stream(self, req: CompletionRequest, tracker: RequestTracker) -> AsyncIterator[bytes]:
        bodies = self._completion_bodies(req)
        streams = [self.workers.events(req.model, b) for b in bodies]
        first = await first_event(streams[0])
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
        totals: Usage = {"prompt_tokens": 0, "completion_tokens": 0}
        offsets: dict[int, int] = {}  # text offset per choice, for logprobs
        sources = [chain(first, streams[0]), *streams[1:]]
        try:
            for p_index, source in enumerate(sources):
                try:
                    async for event in source:
                        if "usage" in event:
                            add_usage(totals, event["usage"])
                            tracker.usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
                        elif "error" in event:
                            tracker.failed(LLMStackError.from_body(event).status_code)
                            yield sse(event)
                            yield SSE_DONE
                            return
                        elif event["text"] or event.get("finish_reason") or event.get("logprobs"):
                            if event["text"]:
                                tracker.first_token()
                            index = p_index * req.n + event["index"]
                            logprobs = None
                            if req.logprobs is not None:
                                logprobs = completion_logprobs(event.get("logprobs") or [], offsets.get(index, 0))
                            offsets[index] = offsets.get(index, 0) + len(event["text"])
                            choice = {
                                "index": index,
                                "text": event["text"],
                                "logprobs": logprobs,
                                "finish_reason": event.get("finish_reason"),
                            }
                            yield sse({**base, "choices": [choice], **usage_field})
                except LLMStackError as exc:
                    tracker.failed(exc.status_code)
                    yield sse(exc.to_body(request_id_var.get()))
                    yield SSE_DONE
                    return
            if req.include_usage:
                yield sse({**base, "choices": [], "usage": usage_block(totals)})
            yield SSE_DONE
        finally:  # as in chat: end every worker stream now when the client leaves early
            for source in sources:
                await source.aclose()
