"""One Anthropic message put together from the worker's events, as the Messages API streams it.

`MessageBuilder` turns worker events into Anthropic's event sequence (`message_start`, per content block
`content_block_start` / `content_block_delta` / `content_block_stop`, `message_delta` with the stop
reason and usage, `message_stop`) and keeps the message that sequence describes; a non-streamed
request returns that message, so both forms agree.  Blocks: `thinking` (a thinking model's reasoning),
`text`, `tool_use` (one per call); one is open at a time.
"""

from __future__ import annotations

import uuid
from typing import Any

from llmstack.common.errors import LLMStackError
from llmstack.services.api.messages.errors import anthropic_error
from llmstack.services.api.messages.protocol import MessagesRequest, tool_input

Event = dict[str, Any]


def tool_use_id(call_id: str | None) -> str:
    return "toolu_" + (call_id.removeprefix("call_") if call_id else uuid.uuid4().hex[:24])


class MessageBuilder:
    def __init__(self, req: MessagesRequest) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = req.model
        self.stop_sequences = set(req.stop_sequences or [])
        self.blocks: list[dict[str, Any]] = []
        self.arguments: dict[int, str] = {}  # block index -> a tool_use block's arguments as streamed
        self.open: int | None = None  # index of the block being written
        self.calls: dict[int, int] = {}  # the worker's call index -> block index
        self.finish_reason = "stop"
        self.stop_sequence: str | None = None
        self.usage = {"input_tokens": 0, "output_tokens": 0}

    def _shell(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    def start(self) -> list[Event]:
        message = {
            **self._shell(),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": dict(self.usage),
        }
        return [{"type": "message_start", "message": message}]

    def feed(self, event: dict[str, Any]) -> list[Event]:
        if "usage" in event:
            # Anthropic counts cache reads apart: input_tokens + cache_read_input_tokens is the whole prompt
            cached = event["usage"].get("cached_tokens", 0)
            self.usage = {
                "input_tokens": event["usage"]["prompt_tokens"] - cached,
                "cache_read_input_tokens": cached,
                "output_tokens": event["usage"]["completion_tokens"],
            }
            return []
        out: list[Event] = []
        if event.get("reasoning"):
            out += self._delta("thinking", {"type": "thinking_delta", "thinking": event["reasoning"]})
        if event["text"]:
            out += self._delta("text", {"type": "text_delta", "text": event["text"]})
        for delta in event.get("tool_calls", ()):
            out += self._call(delta)
        if event.get("finish_reason"):
            self.finish_reason = event["finish_reason"]
            self.stop_sequence = event.get("stop_sequence")
        return out

    def _start_block(self, block: dict[str, Any]) -> list[Event]:
        out = self._close()
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        return [*out, {"type": "content_block_start", "index": self.open, "content_block": dict(block)}]

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        if self.open is None or self.blocks[self.open]["type"] != kind:
            empty = (
                {"type": "thinking", "thinking": "", "signature": ""}
                if kind == "thinking"
                else {"type": "text", "text": ""}
            )
            out += self._start_block(empty)
        assert self.open is not None
        field = "thinking" if kind == "thinking" else "text"
        self.blocks[self.open][field] += delta[field]
        return [*out, {"type": "content_block_delta", "index": self.open, "delta": delta}]

    def _call(self, delta: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        index = self.calls.get(delta["index"])
        if index is None:
            block = {
                "type": "tool_use",
                "id": tool_use_id(delta.get("id")),
                "name": delta["function"].get("name", ""),
                "input": {},
            }
            out += self._start_block(block)
            index = self.calls[delta["index"]] = len(self.blocks) - 1
            self.arguments[index] = ""
        pieces = delta["function"].get("arguments", "")
        if pieces:
            self.arguments[index] += pieces
            out.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": pieces},
                }
            )
        return out

    def _close(self) -> list[Event]:
        index, self.open = self.open, None
        if index is None:
            return []
        block = self.blocks[index]
        if block["type"] == "tool_use":
            block["input"] = tool_input(self.arguments[index])
        return [{"type": "content_block_stop", "index": index}]

    @property
    def stop_reason(self) -> str:
        if self.finish_reason == "tool_calls":
            return "tool_use"
        if self.finish_reason == "length":
            return "max_tokens"
        return "stop_sequence" if self.stop_sequence in self.stop_sequences else "end_turn"

    def finish(self) -> list[Event]:
        out = self._close()
        matched = self.stop_sequence if self.stop_reason == "stop_sequence" else None
        delta = {"type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": matched}}
        return [*out, {**delta, "usage": dict(self.usage)}, {"type": "message_stop"}]

    def message(self) -> dict[str, Any]:
        matched = self.stop_sequence if self.stop_reason == "stop_sequence" else None
        return {
            **self._shell(),
            "content": [dict(b) for b in self.blocks],
            "stop_reason": self.stop_reason,
            "stop_sequence": matched,
            "usage": dict(self.usage),
        }

    @staticmethod
    def fail(exc: LLMStackError) -> list[Event]:
        return [anthropic_error(exc, None)]
