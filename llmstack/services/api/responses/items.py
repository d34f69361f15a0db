"""Responses API input items: parsed strictly by their `type`, and turned into the chat messages the
worker renders with the model's template.

Supported: `message` (also without `type`, as `{"role", "content"}`), `function_call`,
`function_call_output` and `reasoning`.  Other item types (hosted tools, computer use, item references)
are refused by name.  Items are stored as they are parsed here, so a stored conversation reads back the
same way.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmstack.common.errors import InvalidRequest
from llmstack.services.api.bodies import validate


class _Item(BaseModel):
    # fields OpenAI's SDKs send back with an item (ids, statuses, annotations) are accepted and ignored
    model_config = ConfigDict(extra="ignore")


class TextPart(_Item):
    type: str  # which types an item allows is checked by `_check_parts`, naming the part
    text: str | None = None
    refusal: str | None = None

    @property
    def value(self) -> str:
        return self.text if self.text is not None else self.refusal or ""


class Message(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.value for p in self.content)


class FunctionCall(_Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutput(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.value for p in self.output)


class Reasoning(_Item):
    type: Literal["reasoning"]
    summary: list[TextPart] = []
    content: list[TextPart] | None = None

    @property
    def text(self) -> str:
        parts = self.content if self.content else self.summary
        return "".join(p.value for p in parts)


Item = Message | FunctionCall | FunctionCallOutput | Reasoning
_KINDS: dict[str, type[BaseModel]] = {
    "message": Message,
    "function_call": FunctionCall,
    "function_call_output": FunctionCallOutput,
    "reasoning": Reasoning,
}


def parse_items(raw: str | list[Any] | None, at: str = "input") -> list[Item]:
    """Input items from a request (or the store): a string is one user message."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [Message(role="user", content=raw)]
    items: list[Item] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise InvalidRequest(f"Invalid value for '{at}.{i}': an input item is an object", param=f"{at}.{i}")
        kind = entry.get("type", "message" if "role" in entry else None)
        model = _KINDS.get(kind) if isinstance(kind, str) else None
        if model is None:
            known = ", ".join(_KINDS)
            raise InvalidRequest(
                f"Invalid value for '{at}.{i}.type': input items of type {kind!r} are not supported by this "
                f"server; use one of {known}",
                param=f"{at}.{i}.type",
            )
        item = validate(model, entry, (at, i))
        _check_parts(item, f"{at}.{i}")
        items.append(item)  # type: ignore[arg-type]
    return items


def _parts(item: BaseModel) -> list[tuple[str, list[TextPart], set[str]]]:
    """Each list of parts of an item, with the part types allowed there."""
    if isinstance(item, Message):
        return [("content", item.content if isinstance(item.content, list) else [], _MESSAGE_PARTS)]
    if isinstance(item, FunctionCallOutput):
        return [("output", item.output if isinstance(item.output, list) else [], {"input_text", "output_text"})]
    if isinstance(item, Reasoning):
        return [("summary", item.summary, {"summary_text"}), ("content", item.content or [], {"reasoning_text"})]
    return []


_MESSAGE_PARTS = {"input_text", "output_text", "refusal"}


def _check_parts(item: BaseModel, where: str) -> None:
    """Text is all a text model reads: images, files and audio are refused, not silently dropped."""
    for field, parts, allowed in _parts(item):
        for j, part in enumerate(parts):
            at = f"{where}.{field}.{j}"
            if part.type not in allowed:
                raise InvalidRequest(
                    f"Invalid value for '{at}.type': {part.type!r} parts are not supported here; use "
                    + " or ".join(sorted(allowed)),
                    param=f"{at}.type",
                )
            if part.text is None and (part.type != "refusal" or part.refusal is None):
                key = "refusal" if part.type == "refusal" else "text"
                raise InvalidRequest(f"Missing required parameter: '{at}.{key}'.", param=f"{at}.{key}")


def dump_items(items: list[Item]) -> list[dict[str, Any]]:
    return [item.model_dump(exclude_none=True) for item in items]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def to_messages(instructions: str | None, items: list[Item], first_input: int = 0) -> list[dict[str, Any]]:
    """The conversation as chat template messages: consecutive assistant text, reasoning and function
    calls form one assistant turn; a function call output must answer a call made before it.
    `items[first_input:]` are the request's own input (the rest came from previous responses)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}  # call id -> function name
    reasoning = ""

    def assistant_turn() -> dict[str, Any]:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        if reasoning:
            last["reasoning_content"] = reasoning
            reasoning = ""
        return last

    for i, item in enumerate(items):
        if isinstance(item, Reasoning):
            reasoning += item.text
        elif isinstance(item, Message) and item.role == "assistant":
            turn = assistant_turn()
            if turn.get("tool_calls"):  # text after calls: a new turn
                turn = {"role": "assistant", "content": ""}
                messages.append(turn)
            turn["content"] += item.text
        elif isinstance(item, Message):
            messages.append({"role": "system" if item.role == "developer" else item.role, "content": item.text})
        elif isinstance(item, FunctionCall):
            call = {"id": item.call_id, "type": "function"}
            call["function"] = {"name": item.name, "arguments": _arguments(item.arguments)}
            assistant_turn().setdefault("tool_calls", []).append(call)
            names[item.call_id] = item.name
        else:
            if item.call_id not in names:
                raise InvalidRequest(
                    f"No tool call found for function call output with call_id {item.call_id}.",
                    param=f"input.{max(i - first_input, 0)}.call_id",
                )
            messages.append(
                {"role": "tool", "content": item.text, "tool_call_id": item.call_id, "name": names[item.call_id]}
            )
    return messages
