"""`POST /v1/responses` request models: each owns its validation and its conversion to the worker's
terms (sampling params, tools, template variables).  Input items are parsed in `items`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from llmstack.common.errors import InvalidRequest
from llmstack.common.wire import SamplingParams, Structure, ToolSpec
from llmstack.services.api.bodies import validate
from llmstack.services.api.protocol import ReasoningEffort, template_kwargs
from llmstack.services.api.responses.items import Item, parse_items

# OpenAI parameters that mean nothing for a self-hosted model: accepted, ignored
_HARMLESS = {
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "service_tier",
    "include",
    "max_tool_calls",
}
# OpenAI parameters this server cannot honour: refused by name
_UNSUPPORTED = {
    "background": "background responses",
    "conversation": "conversations (use previous_response_id)",
    "prompt": "stored prompts",
    "context_management": "context management",
    "moderation": "moderation",
    "image": "image options",
    "access_programs": "access programs",
    "background_options": "background responses",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None

    def for_worker(self) -> dict[str, Any]:
        """The tool as chat templates (and the worker) take it: OpenAI's chat tool shape."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}

    def echo(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a 'json_schema' format needs 'name' and 'schema'")
        if self.type != "json_schema" and (self.name or self.schema_ is not None):
            raise ValueError(f"a '{self.type}' format takes no 'name' or 'schema'")
        return self

    def structure(self) -> Structure | None:
        if self.type == "json_object":
            return Structure(kind="json_object")
        if self.type == "json_schema":
            return Structure(kind="json_schema", json_schema=self.schema_)
        return None

    def echo(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class TextConfig(_Strict):
    format: TextFormat = TextFormat(type="text")
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None
    mode: str | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    truncation: Literal["auto", "disabled"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM's name)

    _items: list[Item] = PrivateAttr(default_factory=list)
    _tools: list[FunctionTool] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _combinations(self) -> ResponsesRequest:
        for key, value in (self.model_extra or {}).items():
            if key in _UNSUPPORTED:
                if value not in (None, False):
                    raise InvalidRequest(f"{_UNSUPPORTED[key]} are not supported by this server", param=key)
            elif key not in _HARMLESS:
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)
        if self.input is None and self.previous_response_id is None:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input")
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") != "function":
                raise InvalidRequest(
                    f"tool type {tool.get('type')!r} is not supported by this server; only 'function' tools are",
                    param=f"tools.{i}.type",
                )
            self._tools.append(validate(FunctionTool, tool, ("tools", i)))
        names = [t.name for t in self.function_tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("tool names must be unique", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedFunction) and choice.name not in names:
            raise InvalidRequest(
                f"tool_choice names '{choice.name}', which is not among the tools", param="tool_choice"
            )
        if not names and choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools to choose from", param="tool_choice")
        if self.text is not None and self.text.format.type != "text" and names and choice not in ("none",):
            raise InvalidRequest(
                "text.format cannot be enforced together with tools; set tool_choice to 'none' or drop one",
                param="text.format",
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        self.template_kwargs()
        self._items = parse_items(self.input)
        return self

    @property
    def function_tools(self) -> list[FunctionTool]:
        return self._tools

    @property
    def items(self) -> list[Item]:
        """The input as items (a plain string is one user message)."""
        return self._items

    def to_sampling_params(self) -> SamplingParams:
        structure = self.text.format.structure() if self.text is not None else None
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=self.max_output_tokens,
            logprobs=self.top_logprobs,
            structure=structure,
        )

    def tool_spec(self) -> ToolSpec | None:
        tools = self.function_tools
        if not tools:
            return None
        choice = self.tool_choice or "auto"
        named = isinstance(choice, NamedFunction)
        return ToolSpec(
            tools=[t.for_worker() for t in tools],
            choice="function" if named else choice,  # type: ignore[arg-type]
            name=choice.name if isinstance(choice, NamedFunction) else None,
            parallel=self.parallel_tool_calls is not False,
        )

    def template_kwargs(self) -> dict[str, Any] | None:
        effort = self.reasoning.effort if self.reasoning is not None else None
        return template_kwargs(effort, self.chat_template_kwargs)

    def echo(self) -> dict[str, Any]:
        """The request's settings as a response object repeats them."""
        choice = self.tool_choice or "auto"
        text = self.text or TextConfig()
        effort = self.reasoning.effort if self.reasoning is not None else None
        summary = self.reasoning.summary if self.reasoning is not None else None
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": effort, "summary": summary},
            "store": self.store,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "text": {"format": text.format.echo(), **({"verbosity": text.verbosity} if text.verbosity else {})},
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else choice,
            "tools": [t.echo() for t in self.function_tools],
            "top_logprobs": self.top_logprobs,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "truncation": self.truncation or "disabled",
            "metadata": self.metadata or {},
        }
