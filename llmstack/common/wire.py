"""Internal wire protocol between controller, workers and the API server.

Registration and routing bodies are pydantic models (validated at the boundary).  The generation
stream is newline-delimited JSON of small dicts (one per event) because it sits on the per-token hot
path; its shape is the `StreamEvent` TypedDicts at the end, which both sides use.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator

WorkerKind = Literal["chat", "embedding"]
DispatchMethod = Literal["lottery", "shortest_queue"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerStatus(_Strict):
    queue_length: int = Field(0, ge=0, description="requests waiting plus running")
    running: int = Field(0, ge=0)
    speed: float = Field(1.0, gt=0, description="relative speed used by dispatch (tokens/s when measured)")


class WorkerRegistration(_Strict):
    worker_id: str = Field(min_length=1, max_length=128)
    worker_address: str = Field(min_length=1, max_length=2048)
    model_names: list[str] = Field(min_length=1, max_length=64)
    kind: WorkerKind = "chat"
    engine: str = "transformers"
    context_length: int = Field(gt=0)
    capacity: int = Field(1, gt=0)
    status: WorkerStatus = WorkerStatus()

    @field_validator("worker_address")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        if not value.isascii() or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("must be a plain ASCII URL without spaces or control characters")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("must be an http(s) URL with host and port, such as http://127.0.0.1:21002")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("must not carry credentials, a query or a fragment")
        try:
            port = parts.port  # urlsplit raises on a port out of range or not a number
        except ValueError:
            raise ValueError("has an invalid port") from None
        if port == 0:
            raise ValueError("has an invalid port")
        return value.rstrip("/")

    @field_validator("model_names")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or len(name) > 256 or name != name.strip():
                raise ValueError(f"invalid model name {name!r}")
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        return names


class Heartbeat(_Strict):
    worker_id: str
    worker_address: str
    status: WorkerStatus


class HeartbeatReply(BaseModel):
    known: bool


class Unregister(_Strict):
    worker_id: str
    worker_address: str


class WorkerEntry(WorkerRegistration):
    heartbeat_age: float = Field(description="seconds since the last heartbeat, as seen by the controller")
    registered_at: float


class WorkerTable(BaseModel):
    dispatch_method: DispatchMethod
    workers: list[WorkerEntry]
    warming_up: bool = Field(
        False,
        description="the controller started less than one heartbeat expiry ago: live workers may not have "
        "registered again yet, so readers should keep the workers they already know",
    )


class Lookup(_Strict):
    model: str


class Structure(BaseModel):
    """A constraint on the output's form, enforced while decoding: any JSON object, or JSON valid
    against a JSON schema."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingParams(BaseModel):
    """Engine-neutral sampling settings; the API server fills them from an OpenAI request."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per generated token; None: none")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="the same for prompt tokens (echo)")
    logit_bias: dict[int, float] = {}
    structure: Structure | None = None


class ToolSpec(BaseModel):
    """Function calling for one chat request.  `tools` are OpenAI tool definitions; `choice` is
    none / auto / required, or `function` with `name` forced."""

    model_config = ConfigDict(extra="forbid")

    tools: list[dict[str, Any]] = Field(min_length=1)
    choice: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None
    parallel: bool = True


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: SamplingParams = SamplingParams()
    echo: bool = False
    tools: ToolSpec | None = None
    priority: int = Field(0, description="higher goes first in the worker's queue (the API key's priority)")
    report_prompt_tokens: bool = Field(False, description="send a PromptEvent first, before generating")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="further variables for the chat template (enable_thinking, reasoning_effort, ...)"
    )


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: list[str] = Field(min_length=1)
    truncate: bool | None = None


class EmbedReply(BaseModel):
    embeddings: list[list[float]]
    prompt_tokens: int


class CountTokensRequest(BaseModel):
    """Tokenise a prompt or a chat (as `/generate` would); the reply has `count` and `context_length`,
    and with `return_tokens` the ids and their vocabulary entries too."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: ToolSpec | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = Field(None, description="prompts only; default: the tokenizer's own")
    return_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int] = Field(max_length=1_000_000)


class PromptEvent(TypedDict):
    """The stream's first line when the request asked for it (`report_prompt_tokens`): the prompt's token
    count, sent before the request waits for a slot, so the API server can apply a token limit before
    anything is generated."""

    prompt_tokens: int


class TextEvent(TypedDict):
    """A piece of text for choice `index`; `finish_reason` is set on the choice's last event.

    `logprobs`: one entry per token in OpenAI's chat shape (`token`, `logprob`, `bytes`,
    `top_logprobs`); on an echo event they are the prompt's (the first token's logprob is None).
    `tool_calls`: OpenAI's streamed tool-call deltas (`index`, and `id`, `type`, `function.name` on a
    call's first delta; `function.arguments` pieces).  `reasoning`: a thinking model's reasoning text
    (the model's reasoning parser took it out of `text`; it comes before the event's `text`).
    `stop_sequence`: on the last event, the stop string that ended the choice, when one did."""

    index: int
    text: str
    tokens: int
    finish_reason: NotRequired[str | None]
    logprobs: NotRequired[list[dict[str, Any]]]
    tool_calls: NotRequired[list[dict[str, Any]]]
    reasoning: NotRequired[str]
    stop_sequence: NotRequired[str]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: NotRequired[int]
    cached_tokens: NotRequired[int]


class UsageEvent(TypedDict):
    """The stream's last line: exact token counts over all choices (`prompt_tokens`,
    `completion_tokens`, `reasoning_tokens`: the completion tokens spent reasoning, and `cached_tokens`:
    the prompt tokens the engine's prefix cache supplied, part of `prompt_tokens`)."""

    usage: Usage


class ErrorEvent(TypedDict):
    """A typed error after the stream started; the body is OpenAI's error envelope."""

    error: dict[str, Any]


#: One line of a worker's `/generate` stream (NDJSON).  Plain dicts on the hot path, no validation per
#: token: the worker writes them, the API server reads them with `"usage" in event` / `"error" in event`.
StreamEvent = PromptEvent | TextEvent | UsageEvent | ErrorEvent
