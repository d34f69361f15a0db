"""Pieces every endpoint's serving code shares: SSE encoding, the first event pulled before the
response starts (so early failures are HTTP errors), collecting a whole choice, usage blocks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from llmstack.common.errors import LLMStackError
from llmstack.common.http import request_id_var
from llmstack.common.metrics import RequestTracker
from llmstack.common.wire import StreamEvent, TextEvent, Usage

# Characters JSON leaves unescaped that str.splitlines() (and so httpx's iter_lines and many hand-written
# SSE readers) treat as line breaks.  In UTF-8 these byte sequences only ever encode those characters.
_LINE_BREAKERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def sse(obj: dict[str, Any]) -> bytes:
    data = orjson.dumps(obj)  # compact UTF-8, as json.dumps(ensure_ascii=False)
    if b"\xc2\x85" in data or b"\xe2\x80" in data:  # escaped: an SSE line must stay one line for any reader
        for raw, escaped in _LINE_BREAKERS:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(event: dict[str, Any]) -> bytes:
    """An SSE event named by its `type` (the Responses and Anthropic Messages streams are)."""
    return b"event: " + event["type"].encode() + b"\n" + sse(event)


async def first_event(events: AsyncIterator[StreamEvent]) -> StreamEvent | None:
    """Pull the first event so failures before any output surface as a proper HTTP error."""
    try:
        event = await anext(events)
    except StopAsyncIteration:
        return None
    if "error" in event:
        await events.aclose()
        raise LLMStackError.from_body(event)
    return event


async def chain(first: StreamEvent | None, rest: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    try:
        if first is not None:
            yield first
        async for event in rest:
            yield event
    except LLMStackError as exc:  # the worker died mid-stream: end with a proper error event
        yield exc.to_body(request_id_var.get())  # type: ignore[misc]  # an ErrorEvent
    finally:
        await rest.aclose()


class Choice:
    """One choice put together from its stream events."""

    __slots__ = ("parts", "reasoning_parts", "finish", "stop_sequence", "calls", "logprobs")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.reasoning_parts: list[str] = []
        self.finish = "stop"
        self.stop_sequence: str | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[dict[str, Any]] | None = None

    def add(self, event: TextEvent) -> None:
        self.parts.append(event["text"])
        if "reasoning" in event:
            self.reasoning_parts.append(event["reasoning"])
        if event.get("finish_reason"):
            self.finish = event["finish_reason"]
            self.stop_sequence = event.get("stop_sequence")
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

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    def message(self) -> dict[str, Any]:
        text = self.text
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text or (None if self.calls else ""),
            "refusal": None,
        }
        if self.reasoning_parts:  # both names: clients read one or the other
            message["reasoning_content"] = message["reasoning"] = self.reasoning
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message


async def collect(events: AsyncIterator[StreamEvent], n: int, tracker: RequestTracker) -> tuple[list[Choice], Usage]:
    choices = [Choice() for _ in range(n)]
    usage: Usage = {"prompt_tokens": 0, "completion_tokens": 0}
    async for event in events:
        if "usage" in event:
            usage = event["usage"]
            tracker.usage(usage["prompt_tokens"], usage["completion_tokens"])
        elif "error" in event:
            raise LLMStackError.from_body(event)
        else:
            if event["text"] or "tool_calls" in event or "reasoning" in event:
                tracker.first_token()
            choices[event["index"]].add(event)
    return choices, usage


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
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


def add_usage(totals: Usage, usage: Usage) -> None:
    """Add one worker stream's counts (one prompt of a multi-prompt completion) to `totals`; every count the
    worker sends is summed, so a new one needs no change here."""
    for name, count in usage.items():
        totals[name] = totals.get(name, 0) + count  # type: ignore[literal-required]


def usage_block(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object; the details when the worker counted them (cached prompt tokens are part of
    `prompt_tokens`, reasoning tokens part of `completion_tokens`)."""
    block: dict[str, Any] = {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
    }
    if "cached_tokens" in usage:
        block["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
    if "reasoning_tokens" in usage:
        block["completion_tokens_details"] = {"reasoning_tokens": usage["reasoning_tokens"]}
    return block
