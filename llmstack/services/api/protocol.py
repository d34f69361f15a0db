"""OpenAI request models.  Each owns its validation and its conversion to engine sampling params."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmstack.common.errors import InvalidRequest
from llmstack.common.wire import SamplingParams, Structure, ToolSpec

# Parameters of OpenAI's API that carry no meaning for a self-hosted model; accepted, ignored.
_HARMLESS = {
    "store",
    "metadata",
    "service_tier",
    "user",
    "safety_identifier",
    "prompt_cache_key",
}


class _Strict(BaseModel):
    """A request part whose unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _no_unknown(self) -> _OpenAIRequest:
        for key in self.model_extra or {}:
            if key not in _HARMLESS:
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class CalledFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    # an assistant turn's reasoning, under either of the names servers return it as
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        if isinstance(self.content, list):
            for part in self.content:
                if not isinstance(part, TextPart):
                    raise ValueError(f"content part type '{part.type}' is not supported by this model; use 'text'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id', the id of the call it answers")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry tool_calls")
        if (self.reasoning_content is not None or self.reasoning is not None) and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry reasoning")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def for_template(self, call_names: dict[str, str]) -> dict[str, Any]:
        """The message as chat templates read it: tool-call arguments as objects, tool results with
        the name of the function they answer."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        reasoning = self.reasoning_content or self.reasoning
        if reasoning:
            out["reasoning_content"] = reasoning  # the name chat templates of thinking models read
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            name = self.name or call_names.get(self.tool_call_id or "")
            if name:
                out["name"] = name
        return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

# apply_chat_template's own arguments: a request may not set them through chat_template_kwargs
_TEMPLATE_RESERVED = {
    "messages", "conversation", "tools", "documents", "chat_template", "tokenize", "add_generation_prompt",
    "continue_final_message", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding",
    "truncation", "max_length", "tokenizer_kwargs",
}  # fmt: skip


def template_kwargs(
    effort: str | None, kwargs: dict[str, Any] | None, *, param: str = "chat_template_kwargs"
) -> dict[str, Any] | None:
    """Variables for the chat template: `reasoning_effort` (GPT-OSS and others read it) and the
    request's `chat_template_kwargs` (e.g. Qwen3's `enable_thinking`)."""
    out = dict(kwargs or {})
    reserved = sorted(_TEMPLATE_RESERVED & set(out))
    if reserved:
        raise InvalidRequest(f"{param} may not set {', '.join(reserved)}", param=param)
    if effort is not None:
        out.setdefault("reasoning_effort", effort)
    return out or None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _SamplingFields(_OpenAIRequest):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None
    # extensions (vLLM / FastChat names)
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Stop) -> Stop:
        if isinstance(value, list) and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        if self.top_k == 0:
            raise InvalidRequest("top_k must be -1 (disabled) or at least 1", param="top_k")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise InvalidRequest(f"logit_bias keys must be token ids; got {key!r}", param="logit_bias")
        return self

    def _params(self, max_tokens: int | None, **more: Any) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            n=self.n,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            **more,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs 'json_schema'")
        return self

    def structure(self) -> Structure | None:
        if self.type == "json_object":
            return Structure(kind="json_object")
        if self.type == "json_schema":
            assert self.json_schema is not None
            return Structure(kind="json_schema", json_schema=self.json_schema.schema_ or {"type": "object"})
        return None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM's name)

    @model_validator(mode="after")
    def _chat_combinations(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise InvalidRequest(
                    "max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
                    param="max_completion_tokens",
                )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise InvalidRequest(
                    f"'{name}' is deprecated and not supported; send 'tools' and 'tool_choice'", param=name
                )
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise InvalidRequest("tool function names must be unique", param="tools")
            choice = self.tool_choice
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise InvalidRequest(
                    f"tool_choice names '{choice.function.name}', which is not among the tools", param="tool_choice"
                )
            structured = self.response_format is not None and self.response_format.type != "text"
            if structured and choice != "none":
                raise InvalidRequest(
                    "response_format cannot be enforced together with tools; set tool_choice to 'none' or drop one",
                    param="response_format",
                )
        elif self.tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice is only allowed when tools are given", param="tool_choice")
        elif self.parallel_tool_calls is not None:
            raise InvalidRequest(
                "parallel_tool_calls is only allowed when tools are given", param="parallel_tool_calls"
            )
        self.template_kwargs()  # reserved names are refused here, before anything is sent
        return self

    def template_kwargs(self) -> dict[str, Any] | None:
        return template_kwargs(self.reasoning_effort, self.chat_template_kwargs)

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        structure = self.response_format.structure() if self.response_format is not None else None
        return self._params(self.max_completion_tokens or self.max_tokens, logprobs=logprobs, structure=structure)

    def tool_spec(self) -> ToolSpec | None:
        """Function calling as the worker takes it; None without tools."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        named = isinstance(choice, NamedToolChoice)
        return ToolSpec(
            tools=[t.model_dump(exclude_none=True) for t in self.tools],
            choice="function" if named else choice,  # type: ignore[arg-type]
            name=choice.function.name if isinstance(choice, NamedToolChoice) else None,
            parallel=self.parallel_tool_calls is not False,
        )

    def template_messages(self) -> list[dict[str, Any]]:
        names = {c.id: c.function.name for m in self.messages for c in m.tool_calls or []}
        return [m.for_template(names) for m in self.messages]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=20)
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if any(not isinstance(p, str) for p in value):
                raise ValueError("token-id prompts are not supported; send text")
            if len(value) > 64:
                raise ValueError("at most 64 prompts per request")
        return value

    @model_validator(mode="after")
    def _completion_combinations(self) -> CompletionRequest:
        if self.suffix:
            raise InvalidRequest("suffix (insertion) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of other than n is not supported", param="best_of")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo else None
        return self._params(self.max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs)


class EmbeddingRequest(_OpenAIRequest):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("input must not be empty")
        if any(not isinstance(x, str) for x in items):
            raise ValueError("token-id input is not supported; send text (LangChain: check_embedding_ctx_length=False)")
        if any(not x for x in items):
            raise ValueError("input strings must not be empty")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]
