"""The worker's side of the NDJSON stream: one `wire.StreamEvent` per line, built as plain dicts (this
is the per-token path: no validation, one orjson call)."""

from __future__ import annotations

from typing import Any

import orjson

from llmstack.common.errors import LLMStackError
from llmstack.common.wire import ErrorEvent, StreamEvent, TextEvent
from llmstack.services.worker.reasoning import ThinkReader
from llmstack.services.worker.toolcalls import ToolCallReader


def text_event(
    index: int, chunk: Any, reader: ToolCallReader | None = None, thinker: ThinkReader | None = None
) -> TextEvent:
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
    event: TextEvent = {"index": index, "text": text, "tokens": chunk.tokens}
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


def echo_event(index: int, text: str, chunk: Any) -> TextEvent:
    event: TextEvent = {"index": index, "text": text, "tokens": 0}
    if chunk.prompt_logprobs is not None:
        event["logprobs"] = chunk.prompt_logprobs
    return event


def error_event(exc: LLMStackError) -> ErrorEvent:
    return exc.to_body()  # type: ignore[return-value]  # {"error": {...}}: OpenAI's envelope


def line(obj: StreamEvent) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)  # compact UTF-8, as json.dumps(ensure_ascii=False)
