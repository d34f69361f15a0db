"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes: a prompt or a chat (rendered with the
model's template, as generation would) to token ids, and ids back to text."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmstack.common.errors import InvalidRequest
from llmstack.services.api.protocol import ChatMessage, ToolDefinition, template_kwargs
from llmstack.services.api.upstream import WorkerStream


class TokenizeRequest(BaseModel):
    """vLLM's two tokenize bodies in one: `prompt`, or `messages` (with `tools`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ToolDefinition] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("send either 'prompt' or 'messages'", param="prompt")
        if self.messages is None and (self.tools or self.chat_template_kwargs):
            raise InvalidRequest("'tools' and 'chat_template_kwargs' need 'messages'", param="messages")
        if self.messages is not None and self.add_special_tokens:
            raise InvalidRequest("a rendered chat carries its special tokens already", param="add_special_tokens")
        if not self.add_generation_prompt or self.continue_final_message:
            raise InvalidRequest(
                "chats are tokenised as generation renders them: with the generation prompt, the last message closed",
                param="add_generation_prompt" if not self.add_generation_prompt else "continue_final_message",
            )
        template_kwargs(None, self.chat_template_kwargs)
        return self

    def worker_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"return_tokens": True}
        if self.prompt is not None:
            body["prompt"] = self.prompt
            body["add_special_tokens"] = self.add_special_tokens
            return body
        assert self.messages is not None
        names = {c.id: c.function.name for m in self.messages for c in m.tool_calls or []}
        body["messages"] = [m.for_template(names) for m in self.messages]
        if self.tools:
            body["tools"] = {"tools": [t.model_dump(exclude_none=True) for t in self.tools]}
        body["chat_template_kwargs"] = template_kwargs(None, self.chat_template_kwargs)
        return body


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, min_length=1)
    tokens: list[int] = Field(max_length=1_000_000)


class Tokenizer:
    def __init__(self, workers: WorkerStream) -> None:
        self.workers = workers

    def model_for(self, model: str | None) -> str:
        """The model named, or the only chat model there is (vLLM serves one model; the name is optional)."""
        if model is not None:
            return model
        chat = [name for name, entry in self.workers.router.models().items() if entry.kind == "chat"]
        if len(chat) != 1:
            raise InvalidRequest(
                "Missing required parameter: 'model' (this server serves several models).", param="model"
            )
        return chat[0]

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        model = self.model_for(req.model)
        reply = await self.workers.post(model, "/count_tokens", req.worker_body())
        return {
            "count": reply["count"],
            "max_model_len": reply["context_length"],
            "tokens": reply["tokens"],
            "token_strs": reply["token_strs"] if req.return_token_strs else None,
        }

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        reply = await self.workers.post(self.model_for(req.model), "/detokenize", {"tokens": req.tokens})
        return {"prompt": reply["prompt"]}
