"""Function calling on the worker: the constraint that forces a call, and reading calls out of the
model's streamed text.

- `tool_choice: auto`: the model decides; a *parser* (chosen per model, `--tool-parser`) finds calls in
  its text.  `hermes` reads the Hermes / Qwen format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  which `templates.TOOLS_PROMPT` also teaches models whose template knows no tools.
- `required` and a named function: constrained decoding makes the output a JSON array of calls (or the
  named function's arguments), so even a small model returns a valid call.

Readers turn text deltas into (content, tool-call deltas) in OpenAI's streaming shape.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llmstack.common.wire import Structure, ToolSpec

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_names(spec: ToolSpec) -> list[str]:
    return [t["function"]["name"] for t in spec.tools]


def forced_structure(spec: ToolSpec) -> Structure | None:
    """The grammar that forces a call for `required` and named choices; None when the model decides."""
    if spec.choice == "function":
        tool = next(t for t in spec.tools if t["function"]["name"] == spec.name)
        return Structure(kind="json_schema", json_schema=_parameters(tool))
    if spec.choice == "required":
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t["function"]["name"]}, "arguments": _parameters(t)},
                    "required": ["name", "arguments"],
                }
                for t in spec.tools
            ]
        }
        schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if not spec.parallel:
            schema["maxItems"] = 1
        return Structure(kind="json_schema", json_schema=schema)
    return None


def _delta(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _as_call(obj: Any, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) from a parsed `{"name", "arguments"}` object, or None if it is not one."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


class ToolCallReader:
    """Splits one choice's text into content and tool calls as it streams."""

    def __init__(self, spec: ToolSpec) -> None:
        self.spec = spec
        self.names = set(tool_names(spec))
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def finish(self, reason: str) -> tuple[str, list[dict[str, Any]], str]:
        """What is still held back, and the finish reason (`tool_calls` when the model called any)."""
        raise NotImplementedError

    def _reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason


class NamedCallReader(ToolCallReader):
    """The output is the named function's arguments (forced by the grammar): stream them as they come."""

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if not text:
            return "", []
        if self.calls == 0:
            self.calls = 1
            return "", [_delta(0, self.spec.name or "", text)]
        return "", [{"index": 0, "function": {"arguments": text}}]

    def finish(self, reason: str) -> tuple[str, list[dict[str, Any]], str]:
        deltas = [] if self.calls else [_delta(0, self.spec.name or "", "{}" if reason == "stop" else "")]
        self.calls = 1
        return "", deltas, self._reason(reason)


_PARTIAL_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)(")?')
_ARGUMENTS_KEY = re.compile(r'\s*,\s*"arguments"\s*:\s*')


class RequiredCallsReader(ToolCallReader):
    """The output is a JSON array of calls (forced by the grammar): read it whole at the end.  When
    `max_tokens` cut it off, the complete calls and the cut one (its arguments as far as they got) are
    still calls, never content: the client forced a call."""

    def __init__(self, spec: ToolSpec) -> None:
        super().__init__(spec)
        self.text = ""

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += text
        return "", []

    def finish(self, reason: str) -> tuple[str, list[dict[str, Any]], str]:
        try:
            items = json.loads(self.text)
        except ValueError:
            calls = self._cut_off()
        else:
            calls = [c for c in (_as_call(i, self.names) for i in items) if c] if isinstance(items, list) else []
        if not calls:
            return self.text, [], reason
        self.calls = len(calls)
        return "", [_delta(i, name, args) for i, (name, args) in enumerate(calls)], self._reason(reason)

    def _cut_off(self) -> list[tuple[str, str]]:
        """The calls of an array that ends early: the whole ones, then the one cut off."""
        decoder = json.JSONDecoder()
        text = self.text.lstrip()
        if not text.startswith("["):
            return []
        pos, calls = 1, []
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            try:
                item, end = decoder.raw_decode(text, pos)
            except ValueError:
                break
            call = _as_call(item, self.names)
            if call is not None:
                calls.append(call)
            pos = end
        if calls and not text[pos:].strip():  # cut between two calls
            return calls
        return [*calls, self._cut_call(text[pos:])]

    def _cut_call(self, rest: str) -> tuple[str, str]:
        match = _PARTIAL_NAME.match(rest)
        partial = match.group(1) if match else ""
        names = tool_names(self.spec)
        if match and match.group(2) and partial in self.names:
            name = partial
        else:  # even the name was cut off: the first tool it can still be
            name = next((n for n in names if n.startswith(partial)), names[0])
        arguments = ""
        if match and match.group(2):
            key = _ARGUMENTS_KEY.match(rest, match.end())
            arguments = rest[key.end() :] if key else ""
        return name, arguments


class HermesReader(ToolCallReader):
    """`<tool_call>{json}</tool_call>` blocks anywhere in the text; the rest is content.  Text that may
    be the start of an opening tag is held back until it is known not to be one."""

    def __init__(self, spec: ToolSpec) -> None:
        super().__init__(spec)
        self.pending = ""
        self.inside = False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.pending += text
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        while True:
            if self.inside:
                end = self.pending.find(TOOL_CALL_CLOSE)
                if end == -1:
                    break
                body, self.pending = self.pending[:end], self.pending[end + len(TOOL_CALL_CLOSE) :]
                self.inside = False
                self._emit(body, content, deltas)
                continue
            start = self.pending.find(TOOL_CALL_OPEN)
            if start != -1:
                self._content(self.pending[:start], content)
                self.pending = self.pending[start + len(TOOL_CALL_OPEN) :]
                self.inside = True
                continue
            hold = next(
                (
                    k
                    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(TOOL_CALL_OPEN[:k])
                ),
                0,
            )
            self._content(self.pending[: len(self.pending) - hold], content)
            self.pending = self.pending[len(self.pending) - hold :]
            break
        return "".join(content), deltas

    def _content(self, text: str, into: list[str]) -> None:
        if text and not (self.calls and not text.strip()):  # whitespace between calls is not content
            into.append(text)

    def _emit(self, body: str, content: list[str], deltas: list[dict[str, Any]]) -> None:
        try:
            call = _as_call(json.loads(body), self.names)
        except ValueError:
            call = None
        if call is None:  # not a call after all: it is text
            self._content(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE, content)
            return
        deltas.append(_delta(self.calls, *call))
        self.calls += 1

    def finish(self, reason: str) -> tuple[str, list[dict[str, Any]], str]:
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        if self.inside:  # the model ended inside a call: a complete object still counts
            try:
                call = _as_call(json.loads(self.pending), self.names)
            except ValueError:
                call = None
            if call is not None:
                deltas.append(_delta(self.calls, *call))
                self.calls += 1
            else:
                self._content(TOOL_CALL_OPEN + self.pending, content)
        else:
            self._content(self.pending, content)
        self.pending, self.inside = "", False
        return "".join(content), deltas, self._reason(reason)


#: Parsers for `tool_choice: auto`, by the name `--tool-parser` takes.
PARSERS: dict[str, type[ToolCallReader]] = {"hermes": HermesReader}


def reader_for(spec: ToolSpec, parser: str = "hermes") -> ToolCallReader | None:
    if spec.choice == "none":
        return None
    if spec.choice == "function":
        return NamedCallReader(spec)
    if spec.choice == "required":
        return RequiredCallsReader(spec)
    return PARSERS[parser](spec)
