"""OpenAI request models.  Each owns its validation and its conversion to engine sampling params."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InvalidRequest
from ..wire import SamplingParams

# Parameters of OpenAI's API that carry no meaning for a self-hosted model; accepted, ignored.
_HARMLESS = {
    "store",
    "metadata",
    "service_tier",
    "user",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
}


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _no_unknown(self) -> _OpenAIRequest:
        for key in self.model_extra or {}:
            if key not in _HARMLESS:
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        if isinstance(self.content, list):
            for part in self.content:
                if not isinstance(part, TextPart):
                    raise ValueError(f"content part type '{part.type}' is not supported by this model; use 'text'")
        if self.role == "tool" or self.tool_calls:
            raise ValueError("tool messages and tool calls are not supported by this server yet")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def for_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    logit_bias: dict[str, float] | None = None
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
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server yet", param="logit_bias")
        return self

    def _params(self, max_tokens: int | None) -> SamplingParams:
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
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None

    @model_validator(mode="after")
    def _chat_combinations(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise InvalidRequest(
                    "max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
                    param="max_completion_tokens",
                )
        if self.logprobs or self.top_logprobs is not None:
            raise InvalidRequest("logprobs are not supported by this server yet", param="logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(
                f"response_format type '{self.response_format.type}' is not supported by this server yet",
                param="response_format",
            )
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise InvalidRequest(f"'{name}' (function calling) is not supported by this server yet", param=name)
        if self.tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools, which this server does not support yet", param="tool_choice")
        if self.function_call is not None:
            raise InvalidRequest("function_call is not supported by this server yet", param="function_call")
        return self

    def to_sampling_params(self) -> SamplingParams:
        return self._params(self.max_completion_tokens or self.max_tokens)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]


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
        if self.logprobs is not None:
            raise InvalidRequest("logprobs are not supported by this server yet", param="logprobs")
        if self.suffix:
            raise InvalidRequest("suffix (insertion) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of other than n is not supported", param="best_of")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        return self._params(self.max_tokens)


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
