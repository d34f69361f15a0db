"""Self-check of the OpenAPI validator: real-API-shaped bodies pass, and each broken one fails."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import openapi

Validate = Callable[[str, Any], None]

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "tiny",
    "system_fingerprint": None,
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": "你好", "refusal": None},
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}
CHAT_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "tiny",
    "system_fingerprint": None,
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "logprobs": None, "finish_reason": None}],
}
CHAT_USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "tiny",
    "choices": [],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}
COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "tiny",
    "system_fingerprint": None,
    "choices": [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
COMPLETION_CHUNK = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "tiny",
    "choices": [{"index": 0, "text": "he", "logprobs": None, "finish_reason": None}],
}
EMBEDDINGS = {
    "object": "list",
    "model": "minilm",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]},
        {"object": "embedding", "index": 1, "embedding": "AAAAAAAAgD8="},
    ],
    "usage": {"prompt_tokens": 4, "total_tokens": 4},
}
MODELS = {
    "object": "list",
    "data": [{"id": "tiny", "object": "model", "created": 1700000000, "owned_by": "llmstack"}],
}
ERROR = {
    "error": {
        "message": "model 'x' not found",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
}
ERROR_NULLS = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}


def _without(body: dict[str, Any], *path: str | int) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def _with(body: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


VALID = [
    ("CreateChatCompletionResponse", CHAT),
    ("CreateChatCompletionStreamResponse", CHAT_CHUNK),
    ("CreateChatCompletionStreamResponse", CHAT_USAGE_CHUNK),
    ("CreateChatCompletionStreamResponse", _with(CHAT_CHUNK, "stop", "choices", 0, "finish_reason")),
    ("CreateCompletionResponse", COMPLETION),
    ("CreateCompletionStreamResponse", COMPLETION_CHUNK),
    ("CreateCompletionStreamResponse", COMPLETION),
    ("CreateEmbeddingResponse", EMBEDDINGS),
    ("ListModelsResponse", MODELS),
    ("Model", MODELS["data"][0]),
    ("ErrorResponse", ERROR),
    ("ErrorResponse", ERROR_NULLS),
]

INVALID = [
    ("CreateChatCompletionResponse", _without(CHAT, "choices", 0, "message", "refusal"), "refusal"),
    ("CreateChatCompletionResponse", _with(CHAT, "done", "choices", 0, "finish_reason"), "finish_reason"),
    ("CreateChatCompletionResponse", _with(CHAT, None, "choices", 0, "finish_reason"), "finish_reason"),
    ("CreateChatCompletionResponse", _with(CHAT, "chat.completion.chunk", "object"), "object"),
    ("CreateChatCompletionStreamResponse", _without(CHAT_CHUNK, "choices", 0, "finish_reason"), "finish_reason"),
    ("CreateChatCompletionStreamResponse", _with(CHAT_CHUNK, "bot", "choices", 0, "delta", "role"), "role"),
    ("CreateCompletionResponse", COMPLETION_CHUNK, "finish_reason"),
    ("CreateCompletionResponse", _without(COMPLETION, "choices", 0, "logprobs"), "logprobs"),
    ("CreateCompletionStreamResponse", _with(COMPLETION_CHUNK, 3, "choices", 0, "text"), "text"),
    ("CreateEmbeddingResponse", _with(EMBEDDINGS, ["x"], "data", 0, "embedding"), "embedding"),
    ("CreateEmbeddingResponse", _without(EMBEDDINGS, "usage"), "usage"),
    ("ListModelsResponse", _without(MODELS, "data", 0, "owned_by"), "owned_by"),
    ("Model", _with(MODELS["data"][0], "1700000000", "created"), "created"),
    ("ErrorResponse", {"detail": [{"loc": ["body"], "msg": "field required"}]}, "error"),  # FastAPI's 422
    ("ErrorResponse", _without(ERROR_NULLS, "error", "param"), "param"),
    ("ErrorResponse", ERROR["error"], "error"),  # the inner object alone is not a body
]


@pytest.mark.parametrize(("name", "body"), VALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VALID)])
def test_valid(openapi_validate: Validate, name: str, body: dict[str, Any]) -> None:
    openapi_validate(name, body)


@pytest.mark.parametrize(("name", "body", "needle"), INVALID, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(INVALID)])
def test_invalid(openapi_validate: Validate, name: str, body: dict[str, Any], needle: str) -> None:
    with pytest.raises(AssertionError) as info:
        openapi_validate(name, body)
    message = str(info.value)
    assert name in message and needle in message, message


def test_patched_document_has_no_nullable() -> None:
    """Every 3.0 ``nullable`` was rewritten; a leftover would silently be ignored by the validator."""
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("nullable"), bool):
                found.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(openapi.load_document(), "#")
    assert not found, found[:5]


def test_unknown_schema_name() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        openapi.validate("NoSuchSchema", {})
