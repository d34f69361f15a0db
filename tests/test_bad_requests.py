"""Bad requests get the right status and OpenAI's error envelope: never a 500, never FastAPI's 422."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from anthropic.types.shared import ErrorResponse

from tests.support.procs import Service, free_port
from tests.support.stack import Stack

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
USER = [{"role": "user", "content": "hi"}]
CALL_OUTPUT = {"type": "function_call_output", "call_id": "call_nope", "output": "42"}


def chat(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": USER, "max_tokens": 2}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def respond(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "input": "hi", "max_output_tokens": 2}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": USER, "max_tokens": 2}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


# (id, method, path, body (dict = JSON, bytes = raw), status, param or None, code or None)
CASES: list[tuple[str, str, str, Any, int, str | None, str | None]] = [
    ("malformed-json", "POST", CHAT, b'{"model": "tiny", "messages": [', 400, None, None),
    ("body-not-object", "POST", CHAT, b"[1, 2, 3]", 400, None, None),
    ("empty-body", "POST", CHAT, b"", 400, None, None),
    ("missing-model", "POST", CHAT, chat(model=...), 400, "model", None),
    ("missing-messages", "POST", CHAT, chat(messages=...), 400, "messages", None),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, "messages", None),
    ("unknown-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", None),
    ("content-wrong-type", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400, "messages.0.content", None),
    ("user-without-content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages.0", None),
    ("image-part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
     400, "messages.0", None),
    ("temperature-type", "POST", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("temperature-range", "POST", CHAT, chat(temperature=3), 400, "temperature", None),
    ("top-p-range", "POST", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("top-k-zero", "POST", CHAT, chat(top_k=0), 400, "top_k", None),
    ("n-zero", "POST", CHAT, chat(n=0), 400, "n", None),
    ("n-huge", "POST", CHAT, chat(n=1000), 400, "n", None),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-type", "POST", CHAT, chat(max_tokens="ten"), 400, "max_tokens", None),
    ("too-many-stops", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("presence-range", "POST", CHAT, chat(presence_penalty=5), 400, "presence_penalty", None),
    ("seed-type", "POST", CHAT, chat(seed="abc"), 400, "seed", None),
    ("stream-options-no-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("unknown-parameter", "POST", CHAT, chat(frobnicate=True), 400, "frobnicate", None),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("top-logprobs-range", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("tool-choice-without-tools", "POST", CHAT, chat(tool_choice="required"), 400, "tool_choice", None),
    ("tool-bad-name", "POST", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "a b", "parameters": {}}}]), 400, "tools.0.function.name",
     None),
    ("functions-deprecated", "POST", CHAT, chat(functions=[{"name": "f"}]), 400, "functions", None),
    ("json-schema-missing", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format", None),
    ("response-format-type", "POST", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type", None),
    ("logit-bias-key", "POST", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", None),
    ("logit-bias-range", "POST", CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias.5", None),
    ("logit-bias-vocabulary", "POST", CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias", None),
    ("completion-logprobs-range", "POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "logprobs": 6}, 400, "logprobs",
     None),
    ("conflicting-max-tokens", "POST", CHAT, chat(max_tokens=5, max_completion_tokens=6), 400, "max_completion_tokens",
     None),
    ("unknown-model", "POST", CHAT, chat(model="no-such-model"), 404, "model", "model_not_found"),
    ("context-too-long", "POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 3000}]), 400, "messages",
     "context_length_exceeded"),
    ("max-tokens-beyond-context", "POST", CHAT, chat(max_tokens=4000), 400, "max_tokens", "context_length_exceeded"),
    ("chat-with-embedding-model", "POST", CHAT, chat(model="all-MiniLM-L6-v2"), 400, "model", None),
    ("completion-token-prompt", "POST", COMPLETIONS, {"model": "tiny", "prompt": [1, 2, 3]}, 400, "prompt", None),
    ("completion-suffix", "POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "suffix": "b"}, 400, "suffix", None),
    ("completion-missing-prompt", "POST", COMPLETIONS, {"model": "tiny"}, 400, "prompt", None),
    ("embedding-empty-input", "POST", EMBEDDINGS, {"model": "all-MiniLM-L6-v2", "input": []}, 400, "input", None),
    ("embedding-empty-string", "POST", EMBEDDINGS, {"model": "all-MiniLM-L6-v2", "input": ""}, 400, "input", None),
    ("embedding-bad-format", "POST", EMBEDDINGS,
     {"model": "all-MiniLM-L6-v2", "input": "x", "encoding_format": "hex"}, 400, "encoding_format", None),
    ("embedding-unknown-model", "POST", EMBEDDINGS, {"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
    ("unknown-route", "GET", "/v1/nothing-here", None, 404, None, None),
    ("trailing-slash", "GET", "/v1/responses//", None, 404, None, None),  # not a redirect
    ("wrong-method", "GET", CHAT, None, 405, None, None),
    ("unknown-model-get", "GET", "/v1/models/no-such-model", None, 404, "model", "model_not_found"),
    # OpenAI checks the model first: an unknown one is a 404 whatever else the body lacks; a known one a 400
    ("unknown-model-and-missing-field", "POST", CHAT, {"model": "foo"}, 404, "model", "model_not_found"),
    ("unknown-model-and-wrong-type", "POST", CHAT, chat(model="foo", max_tokens="5"), 404, "model", "model_not_found"),
    ("known-model-and-missing-field", "POST", CHAT, {"model": "tiny"}, 400, "messages", None),
    # no type coercion: a string is not a boolean or a number
    ("stream-string", "POST", CHAT, chat(stream="yes"), 400, "stream", "invalid_type"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="5"), 400, "max_tokens", "invalid_type"),
    ("temperature-string", "POST", CHAT, chat(temperature="0.5"), 400, "temperature", "invalid_type"),
    ("n-float", "POST", CHAT, chat(n=1.5), 400, "n", "invalid_type"),
    ("completion-echo-string", "POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "echo": "true"}, 400, "echo",
     "invalid_type"),
    ("template-kwargs-reserved", "POST", CHAT, chat(chat_template_kwargs={"chat_template": "{{ 1 }}"}), 400,
     "chat_template_kwargs", None),
    ("reasoning-on-user", "POST", CHAT, chat(messages=[{"role": "user", "content": "x", "reasoning": "y"}]), 400,
     "messages.0", None),
    ("reasoning-effort-value", "POST", CHAT, chat(reasoning_effort="huge"), 400, "reasoning_effort", None),
    # the Responses API
    ("responses-unknown-model", "POST", RESPONSES, respond(model="nope"), 404, "model", "model_not_found"),
    ("responses-missing-input", "POST", RESPONSES, respond(input=...), 400, "input", None),
    ("responses-unknown-item-type", "POST", RESPONSES, respond(input=[{"type": "computer_call", "id": "x"}]), 400,
     "input.0.type", None),
    ("responses-item-not-object", "POST", RESPONSES, respond(input=["hi"]), 400, "input.0", None),
    ("responses-image-part", "POST", RESPONSES,
     respond(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]), 400,
     "input.0.content.0.type", None),
    ("responses-call-field-missing", "POST", RESPONSES, respond(input=[{"type": "function_call", "call_id": "c"}]),
     400, "input.0.name", None),
    ("responses-output-for-no-call", "POST", RESPONSES, respond(input=[CALL_OUTPUT]), 400, "input.0.call_id", None),
    ("responses-unknown-previous", "POST", RESPONSES, respond(previous_response_id="resp_nope"), 404,
     "previous_response_id", "previous_response_not_found"),
    ("responses-wrong-type", "POST", RESPONSES, respond(max_output_tokens="5"), 400, "max_output_tokens",
     "invalid_type"),
    ("responses-stream-string", "POST", RESPONSES, respond(stream="yes"), 400, "stream", "invalid_type"),
    ("responses-over-long-input", "POST", RESPONSES, respond(input="word " * 3000), 400, "input",
     "context_length_exceeded"),
    ("responses-hosted-tool", "POST", RESPONSES, respond(tools=[{"type": "web_search"}]), 400, "tools.0.type", None),
    ("responses-tool-bad-name", "POST", RESPONSES, respond(tools=[{"type": "function", "name": "a b"}]), 400,
     "tools.0.name", None),
    ("responses-tool-choice-without-tools", "POST", RESPONSES, respond(tool_choice="required"), 400, "tool_choice",
     None),
    ("responses-schema-without-name", "POST", RESPONSES,
     respond(text={"format": {"type": "json_schema", "schema": {}}}), 400, "text.format", None),
    ("responses-background", "POST", RESPONSES, respond(background=True), 400, "background", None),
    ("responses-unknown-parameter", "POST", RESPONSES, respond(frobnicate=1), 400, "frobnicate", None),
    ("responses-get-unknown", "GET", "/v1/responses/resp_nope", None, 404, "response_id", "response_not_found"),
    ("responses-delete-unknown", "DELETE", "/v1/responses/resp_nope", None, 404, "response_id", "response_not_found"),
    # /tokenize and /detokenize
    ("tokenize-both-inputs", "POST", "/tokenize", {"model": "tiny", "prompt": "x", "messages": USER}, 400, "prompt",
     None),
    ("tokenize-unknown-model", "POST", "/tokenize", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("tokenize-model-needed", "POST", "/tokenize", {"prompt": "x"}, 400, "model", None),
    ("detokenize-outside-vocabulary", "POST", "/detokenize", {"model": "tiny", "tokens": [1, 10**9]}, 400, "tokens",
     None),
    ("detokenize-wrong-type", "POST", "/detokenize", {"model": "tiny", "tokens": ["a"]}, 400, "tokens.0",
     "invalid_type"),
]  # fmt: skip

# (id, body, status, Anthropic error type): /v1/messages answers in Anthropic's error shape
ANTHROPIC_CASES: list[tuple[str, Any, int, str]] = [
    ("malformed-json", b'{"model": "tiny", "messages": [', 400, "invalid_request_error"),
    ("missing-max-tokens", message(max_tokens=...), 400, "invalid_request_error"),
    ("unknown-model", message(model="nope"), 404, "not_found_error"),
    ("unknown-model-and-missing-field", {"model": "nope"}, 404, "not_found_error"),
    ("max-tokens-string", message(max_tokens="5"), 400, "invalid_request_error"),
    ("temperature-range", message(temperature=1.5), 400, "invalid_request_error"),
    ("unknown-block", message(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), 400,
     "invalid_request_error"),
    ("tool-use-in-user-turn", message(messages=[{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]), 400, "invalid_request_error"),
    ("tool-result-for-no-call", message(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]), 400, "invalid_request_error"),
    ("server-tool", message(tools=[{"type": "web_search_20250305", "name": "web_search"}]), 400,
     "invalid_request_error"),
    ("tool-without-schema", message(tools=[{"name": "f"}]), 400, "invalid_request_error"),
    ("tool-choice-unknown-tool", message(tools=[{"name": "f", "input_schema": {"type": "object"}}],
                                         tool_choice={"type": "tool", "name": "g"}), 400, "invalid_request_error"),
    ("prefill", message(messages=[*USER, {"role": "assistant", "content": "Sure"}]), 400, "invalid_request_error"),
    ("over-long-input", message(messages=[{"role": "user", "content": "word " * 3000}]), 400, "invalid_request_error"),
    ("unknown-parameter", message(frobnicate=1), 400, "invalid_request_error"),
    ("empty-stop-sequence", message(stop_sequences=[""]), 400, "invalid_request_error"),
]  # fmt: skip


def _send(client: httpx.Client, method: str, path: str, body: Any, headers: dict[str, str] | None = None):
    if isinstance(body, bytes):
        return client.request(
            method, path, content=body, headers={"content-type": "application/json", **(headers or {})}
        )
    return client.request(method, path, json=body, headers=headers)


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "status", "param", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request(api: httpx.Client, openapi_validate, name, method, path, body, status, param, code) -> None:
    resp = _send(api, method, path, body)
    assert resp.status_code == status, resp.text
    payload = resp.json()
    assert "detail" not in payload
    openapi_validate("ErrorResponse", payload)
    error = payload["error"]
    assert error["message"] and isinstance(error["message"], str)
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert resp.headers.get("x-request-id")


@pytest.mark.parametrize(("name", "body", "status", "kind"), ANTHROPIC_CASES, ids=[c[0] for c in ANTHROPIC_CASES])
def test_bad_anthropic_request(api: httpx.Client, name: str, body: Any, status: int, kind: str) -> None:
    for path in (MESSAGES, f"{MESSAGES}/count_tokens"):
        if path != MESSAGES and isinstance(body, dict):  # count_tokens takes the conversation only
            body = {k: v for k, v in body.items() if k not in ("max_tokens", "temperature", "stop_sequences")}
            if name in ("missing-max-tokens", "max-tokens-string", "temperature-range", "empty-stop-sequence"):
                continue
            if name == "over-long-input":  # counting a long conversation is fine: it is not generated
                continue
        resp = _send(api, "POST", path, body)
        assert resp.status_code == status, (path, resp.text)
        payload = resp.json()
        ErrorResponse.model_validate(payload, strict=True)  # the anthropic SDK's own error type
        assert payload["error"]["type"] == kind and payload["error"]["message"], payload
        assert payload["request_id"] == resp.headers["x-request-id"]


def test_anthropic_streams_refuse_before_the_first_event(api: httpx.Client) -> None:
    resp = api.post(MESSAGES, json=message(model="nope", stream=True))
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    big = api.post(MESSAGES, content=b'{"model": "' + b"x" * (17 * 1024 * 1024) + b'"}')
    assert big.status_code == 413 and big.json()["type"] == "error"  # Anthropic's shape from the body limit too


def test_streaming_errors_before_first_token_are_http_errors(api: httpx.Client) -> None:
    resp = api.post(CHAT, json=chat(model="no-such-model", stream=True))
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_body_size_limit(api: httpx.Client) -> None:
    resp = api.post(CHAT, content=b'{"model": "' + b"x" * (17 * 1024 * 1024) + b'"}')
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


@pytest.fixture(scope="module")
def keyed_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    svc = Service(
        "api-keys",
        ["api", "--port", str(port), "--controller-address", stack.controller_url, "--sync-interval", "0.2"],
        tmp_path_factory.mktemp("keyed-api"),
        env={"LLMSTACK_API_KEYS": "sk-alpha,sk-beta"},
    ).start()
    try:
        svc.wait_healthy(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        svc.stop()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer sk-wrong"}, 401),
        ({"Authorization": "Basic sk-alpha"}, 401),
        ({"x-api-key": "sk-wrong"}, 401),
        ({"Authorization": "Bearer sk-alpha"}, 200),
        ({"Authorization": "Bearer sk-beta"}, 200),
        ({"x-api-key": "sk-beta"}, 200),  # Anthropic's clients send their key so; the same keys
    ],
)
def test_api_keys(keyed_api: str, openapi_validate, headers: dict[str, str], status: int) -> None:
    resp = httpx.get(f"{keyed_api}/v1/models", headers=headers)
    assert resp.status_code == status, resp.text
    if status == 401:
        openapi_validate("ErrorResponse", resp.json())
        assert resp.json()["error"]["type"] == "authentication_error"
        assert "sk-alpha" not in resp.text


def test_api_keys_are_not_logged(keyed_api: str, stack: Stack) -> None:
    httpx.get(f"{keyed_api}/v1/models", headers={"Authorization": "Bearer sk-alpha"})
    httpx.get(f"{keyed_api}/v1/models", headers={"Authorization": "Bearer sk-guess"})
    for log in stack.group.log_dir.parent.rglob("*.log"):
        text = log.read_text(errors="replace")
        assert "sk-alpha" not in text and "sk-guess" not in text, log


def test_errors_are_json_even_for_garbage_content_type(api: httpx.Client) -> None:
    resp = api.post(CHAT, content=b"model=tiny", headers={"content-type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 400
    json.loads(resp.text)
