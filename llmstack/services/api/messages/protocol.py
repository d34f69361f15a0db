"""`POST /v1/messages` (Anthropic's Messages API) request models: validation, content blocks, and the
conversion to the worker's terms (chat template messages, tools, sampling params)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from llmstack.common.errors import InvalidRequest
from llmstack.common.wire import SamplingParams, Structure, ToolSpec
from llmstack.services.api.bodies import validate
from llmstack.services.api.protocol import template_kwargs

# parameters that mean nothing for a self-hosted model: accepted, ignored
_HARMLESS = {
    "metadata", "service_tier", "inference_geo", "speed", "cache_control", "diagnostics", "user_profile_id",
    "workspace_id",
}  # fmt: skip
_UNSUPPORTED = {"container": "containers", "mcp_servers": "MCP servers", "context_management": "context management"}


class _Block(BaseModel):
    # cache_control, citations and the like mean nothing here: accepted, ignored
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    @property
    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or [])
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
_BLOCKS: dict[str, type[BaseModel]] = {
    "text": TextBlock,
    "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock,
    "thinking": ThinkingBlock,
    "redacted_thinking": RedactedThinkingBlock,
}
_BY_ROLE = {"user": {"text", "tool_result"}, "assistant": {"text", "tool_use", "thinking", "redacted_thinking"}}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]

    def blocks(self, where: str) -> list[Block]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        blocks: list[Block] = []
        for j, raw in enumerate(self.content):
            kind = raw.get("type")
            at = f"{where}.content.{j}"
            if not isinstance(kind, str) or kind not in _BY_ROLE[self.role]:
                allowed = " or ".join(sorted(_BY_ROLE[self.role]))
                raise InvalidRequest(
                    f"{at}.type: {kind!r} blocks are not supported in a '{self.role}' message here; use {allowed}",
                    param=f"{at}.type",
                )
            blocks.append(validate(_BLOCKS[kind], raw, tuple(at.split("."))))  # type: ignore[arg-type]
        return blocks


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    def for_worker(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description, "parameters": self.input_schema}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class _Conversation(BaseModel):
    """What `/v1/messages` and `/v1/messages/count_tokens` share."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM's name)

    _tools: list[Tool] = PrivateAttr(default_factory=list)
    _turns: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _conversation(self) -> _Conversation:
        for key, value in (self.model_extra or {}).items():
            if key in _UNSUPPORTED:
                if value is not None:
                    raise InvalidRequest(f"{_UNSUPPORTED[key]} are not supported by this server", param=key)
            elif key not in _HARMLESS:
                raise InvalidRequest(f"{key}: Extra inputs are not permitted", param=key)
        for i, raw in enumerate(self.tools or []):
            if raw.get("type") not in (None, "custom"):
                raise InvalidRequest(
                    f"tools.{i}.type: server tools ({raw.get('type')!r}) are not supported by this server; "
                    "define client tools with name, description and input_schema",
                    param=f"tools.{i}.type",
                )
            self._tools.append(validate(Tool, raw, ("tools", i)))
        names = [t.name for t in self._tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools: tool names must be unique", param="tools")
        choice = self.tool_choice
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise InvalidRequest(f"tool_choice.name: '{choice.name}' is not among the tools", param="tool_choice.name")
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise InvalidRequest("tool_choice: needs tools to choose from", param="tool_choice")
        structured = self.output_config is not None and self.output_config.format is not None
        if structured and names and (choice is None or choice.type != "none"):
            raise InvalidRequest(
                "output_config.format cannot be enforced together with tools; set tool_choice to none or drop one",
                param="output_config.format",
            )
        if self.messages[-1].role != "user":
            raise InvalidRequest(
                "messages: the last message must be from the user (prefilling the assistant's reply is not "
                "supported by this server)",
                param="messages",
            )
        self._turns = self._to_messages()
        self.template_kwargs()
        return self

    def _to_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.system:
            text = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": text})
        names: dict[str, str] = {}  # tool_use id -> tool name
        for i, message in enumerate(self.messages):
            blocks = message.blocks(f"messages.{i}")
            if message.role == "assistant":
                out.append(_assistant(blocks, names))
                continue
            for j, block in enumerate(blocks):
                if isinstance(block, ToolResultBlock):
                    if block.tool_use_id not in names:
                        raise InvalidRequest(
                            f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                            f"{block.tool_use_id}. Each `tool_result` block must answer a `tool_use` block before it.",
                            param=f"messages.{i}.content.{j}.tool_use_id",
                        )
                    tool = {"role": "tool", "content": block.text, "tool_call_id": block.tool_use_id}
                    out.append({**tool, "name": names[block.tool_use_id]})
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                out.append({"role": "user", "content": text})
        return out

    @property
    def template_messages(self) -> list[dict[str, Any]]:
        return self._turns

    def tool_spec(self) -> ToolSpec | None:
        if not self._tools:
            return None
        choice = self.tool_choice or ToolChoice(type="auto")
        kind = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[choice.type]
        return ToolSpec(
            tools=[t.for_worker() for t in self._tools],
            choice=kind,  # type: ignore[arg-type]
            name=choice.name if choice.type == "tool" else None,
            parallel=not choice.disable_parallel_tool_use,
        )

    def template_kwargs(self) -> dict[str, Any] | None:
        """`thinking` as Qwen3-style templates read it (`enable_thinking`), `output_config.effort` as
        `reasoning_effort`, and the request's own `chat_template_kwargs`."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.thinking is not None and self.thinking.type != "adaptive":
            kwargs.setdefault("enable_thinking", self.thinking.type != "disabled")
        effort = self.output_config.effort if self.output_config is not None else None
        return template_kwargs(effort, kwargs)

    def structure(self) -> Structure | None:
        if self.output_config is None or self.output_config.format is None:
            return None
        return Structure(kind="json_schema", json_schema=self.output_config.format.schema_)


def _assistant(blocks: list[Block], names: dict[str, str]) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(b.text for b in blocks if isinstance(b, TextBlock))}
    thinking = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    if thinking:
        turn["reasoning_content"] = thinking
    calls = [b for b in blocks if isinstance(b, ToolUseBlock)]
    if calls:
        turn["tool_calls"] = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}} for b in calls
        ]
        names.update({b.id: b.name for b in calls})
    return turn


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    # the newest anthropic SDKs no longer send these; other clients still do
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _sampling(self) -> MessagesRequest:
        if any(not s for s in self.stop_sequences or []):
            raise InvalidRequest("stop_sequences: stop sequences must not be empty", param="stop_sequences")
        return self

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k if self.top_k else -1,
            max_tokens=self.max_tokens,
            stop=list(self.stop_sequences or []),
            structure=self.structure(),
        )


class CountTokensRequest(_Conversation):
    """`/v1/messages/count_tokens`: the conversation only."""


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object a `tool_use` block carries ({} when they are not one: cut off)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
