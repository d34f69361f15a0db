"""One response put together from the worker's events, as the Responses API streams it.

`ResponseBuilder` turns worker events into the Responses event sequence (`response.created`,
`response.in_progress`, then per output item `output_item.added` / deltas / `output_item.done`, then
`response.completed` or `response.incomplete`) and keeps the response object that sequence describes;
a non-streamed request runs the same builder and returns that object, so both forms agree.

Output items, in the order the model wrote them: `reasoning` (a thinking model's reasoning),
`message` (text), `function_call` (one per call).  One item is open at a time.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from llmstack.common.errors import LLMStackError
from llmstack.services.api.responses.protocol import ResponsesRequest

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    def __init__(self, req: ResponsesRequest, response_id: str | None = None) -> None:
        self.id = response_id or new_id("resp")
        self.created_at = int(time.time())
        self.echo = req.echo()
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the output item being written
        self.calls: dict[int, dict[str, Any]] = {}  # the worker's call index -> function_call item
        self.finish_reason = "stop"
        self.usage: dict[str, Any] | None = None
        self.status = "in_progress"
        self.error: dict[str, Any] | None = None

    # -- the response object --------------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        done = self.status == "completed"
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "completed_at": int(time.time()) if done else None,
            "error": self.error,
            "incomplete_details": incomplete,
            **self.echo,
            "output": [_copy(item) for item in self.output],
            **({"usage": self.usage} if self.usage is not None else {}),
        }

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return event

    def start(self) -> list[Event]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    # -- worker events ----------------------------------------------------------------------------------
    def feed(self, event: dict[str, Any]) -> list[Event]:
        """The Responses events for one worker event."""
        if "usage" in event:
            self._count(event["usage"])
            return []
        out: list[Event] = []
        if event.get("reasoning"):
            out += self._reasoning(event["reasoning"])
        if event["text"]:
            out += self._text(event["text"], event.get("logprobs") or [])
        for delta in event.get("tool_calls", ()):
            out += self._call(delta)
        if event.get("finish_reason"):
            self.finish_reason = event["finish_reason"]
        return out

    def _switch(self, kind: str) -> list[Event]:
        """Close the open item unless it is of `kind`."""
        if self.open is not None and self.open["type"] == kind:
            return []
        return self._close()

    def _add(self, item: dict[str, Any], part: dict[str, Any] | None = None) -> list[Event]:
        self.output.append(item)
        self.open = item
        index = len(self.output) - 1
        out = [self._event("response.output_item.added", output_index=index, item=_copy(item))]
        if part is not None:
            item["content"].append(dict(part))
            out.append(
                self._event(
                    "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
        return out

    def _reasoning(self, text: str) -> list[Event]:
        out = self._switch("reasoning")
        if self.open is None:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            out += self._add(item, {"type": "reasoning_text", "text": ""})
        assert self.open is not None
        self.open["content"][0]["text"] += text
        where = {"item_id": self.open["id"], "output_index": len(self.output) - 1, "content_index": 0}
        return [*out, self._event("response.reasoning_text.delta", **where, delta=text)]

    def _text(self, text: str, logprobs: list[dict[str, Any]]) -> list[Event]:
        out = self._switch("message")
        if self.open is None:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "content": [], "status": "in_progress"}
            out += self._add(item, {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        assert self.open is not None
        part = self.open["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        where = {"item_id": self.open["id"], "output_index": len(self.output) - 1, "content_index": 0}
        return [*out, self._event("response.output_text.delta", **where, delta=text, logprobs=logprobs)]

    def _call(self, delta: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        item = self.calls.get(delta["index"])
        if item is None:
            out += self._close()
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "call_id": delta.get("id") or new_id("call"),
                "name": delta["function"].get("name", ""),
                "arguments": "",
                "status": "in_progress",
            }
            self.calls[delta["index"]] = item
            out += self._add(item)
        pieces = delta["function"].get("arguments", "")
        if pieces:
            item["arguments"] += pieces
            index = self.output.index(item)
            out.append(
                self._event(
                    "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=pieces
                )
            )
        return out

    def _close(self) -> list[Event]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        where = {"item_id": item["id"], "output_index": index}
        out: list[Event] = []
        if item["type"] == "reasoning":
            part = item["content"][0]
            out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=dict(part)))
        elif item["type"] == "message":
            part = item["content"][0]
            out.append(
                self._event(
                    "response.output_text.done", **where, content_index=0, text=part["text"], logprobs=part["logprobs"]
                )
            )
            out.append(self._event("response.content_part.done", **where, content_index=0, part=_copy(part)))
        else:
            args = {"name": item["name"], "arguments": item["arguments"]}
            out.append(self._event("response.function_call_arguments.done", **where, **args))
        item["status"] = "incomplete" if self.finish_reason == "length" and item["type"] == "message" else "completed"
        out.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        return out

    def _count(self, usage: dict[str, Any]) -> None:
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        self.usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0), "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens", 0)},
            "total_tokens": prompt + completion,
        }

    # -- the end ----------------------------------------------------------------------------------------
    def finish(self) -> list[Event]:
        out = self._close()
        self.status = "incomplete" if self.finish_reason == "length" else "completed"
        kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
        return [*out, self._event(kind, response=self.response())]

    def fail(self, exc: LLMStackError) -> list[Event]:
        """The stream broke off (the worker failed): an `error` event, then `response.failed`."""
        self.open = None
        self.status = "failed"
        self.error = {"code": "server_error", "message": exc.message}
        error = self._event("error", code=exc.code or exc.type, message=exc.message, param=exc.param)
        return [error, self._event("response.failed", response=self.response())]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of an item as it is now (its content list is still being written)."""
    out = dict(item)
    if "content" in out:
        out["content"] = [dict(part) for part in out["content"]]
    return out
