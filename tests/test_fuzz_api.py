"""Property-based fuzzing of the API server's /v1 surface (hypothesis): over 1,400 generated requests, valid
and invalid, never a 5xx; every 4xx is OpenAI's error envelope (Anthropic's on /v1/messages, in the anthropic
SDK's types); every 200 is valid against OpenAI's OpenAPI document (SSE chunks and Responses events included),
or, on /v1/messages, parses in the anthropic SDK's strict types; the server stays up.

Valid bodies keep `max_tokens` (and `n`) small so the run takes a minute or two on the tiny model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from anthropic.types import Message as AnthropicMessage
from anthropic.types import RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse as AnthropicError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from tests.conftest import ALIAS
from tests.support.agent_apis import EVENT_SCHEMAS
from tests.support.api_depth import SCHEMAS, TOOLS
from tests.support.stack import Stack

CHAT_MODELS = ["tiny", ALIAS, "tiny-8bit", "no-such-model", ""]
EMBED_MODELS = ["all-MiniLM-L6-v2", "tiny", "no-such-model"]
SMALL = 4  # the largest max_tokens / n a generated request may ask for

Validate = Callable[[str, Any], None]

# -- JSON values -------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
short_text = st.text(max_size=40)
stop = st.text(min_size=0, max_size=5) | st.lists(st.text(max_size=5), max_size=5) | st.none()

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": short_text},
    optional={"name": st.text(max_size=8)},
)
sampling = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, SMALL),
    "stream": st.booleans(),
    "stop": stop,
    "seed": st.integers(0, 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "top_k": st.integers(-1, 50),
    "repetition_penalty": st.floats(0.5, 2),
    "user": st.text(max_size=8),
    "ignore_eos": st.booleans(),
}
chat_valid = st.fixed_dictionaries(
    {
        "model": st.sampled_from(CHAT_MODELS[:3]),
        "messages": st.lists(message, min_size=1, max_size=3),
        "max_tokens": st.integers(1, SMALL),
    },
    optional={**sampling, "stream_options": st.just({"include_usage": True}), "max_completion_tokens": st.just(2)},
)
prompt = st.text(max_size=40) | st.lists(st.text(max_size=20), min_size=1, max_size=3)
completion_valid = st.fixed_dictionaries(
    {"model": st.sampled_from(CHAT_MODELS[:3]), "prompt": prompt, "max_tokens": st.integers(1, SMALL)},
    optional={**sampling, "echo": st.booleans(), "suffix": st.none()},
)
embedding_valid = st.fixed_dictionaries(
    {
        "model": st.sampled_from(EMBED_MODELS[:2]),
        "input": st.text(min_size=1, max_size=40) | st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=3),
    },
    optional={"encoding_format": st.sampled_from(["float", "base64"]), "user": st.text(max_size=8)},
)


# the Responses API: text or items in, function tools, text formats, stored conversations
response_input = short_text | st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "developer", "assistant"]), "content": short_text},
        optional={"type": st.just("message")},
    ),
    min_size=1,
    max_size=3,
)
responses_valid = st.fixed_dictionaries(
    {
        "model": st.sampled_from(CHAT_MODELS[:3]),
        "input": response_input,
        "max_output_tokens": st.integers(1, SMALL),
    },
    optional={
        "instructions": short_text,
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "stream": st.booleans(),
        "store": st.booleans(),
        "tools": st.just([{"type": "function", **t["function"]} for t in TOOLS]),
        "tool_choice": st.sampled_from(["auto", "none"]),
        "reasoning": st.just({"effort": "low"}),
        "metadata": st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3),
        "previous_response_id": st.just("resp_unknown"),
    },
)
# Anthropic's Messages API
anthropic_valid = st.fixed_dictionaries(
    {
        "model": st.sampled_from(CHAT_MODELS[:3]),
        "max_tokens": st.integers(1, SMALL),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": short_text}), min_size=1, max_size=2
        ),
    },
    optional={
        "system": short_text,
        "stream": st.booleans(),
        "temperature": st.floats(0, 1),
        "top_k": st.integers(0, 50),
        "stop_sequences": st.lists(st.text(min_size=1, max_size=5), max_size=3),
        "tools": st.just([{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]),
        "thinking": st.sampled_from([{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}]),
        "metadata": st.just({"user_id": "u1"}),
        "output_config": st.just({"format": {"type": "json_schema", "schema": SCHEMAS["mood"]}}),
    },
)


def _bounded(body: Any) -> Any:
    """Keep generated work small: a number of tokens or choices between SMALL and a million becomes SMALL
    (larger ones stay: they must be rejected as context overflow), and a chat without a limit gets one."""
    if not isinstance(body, dict):
        return body
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and SMALL < value < 1e6:
            body[key] = SMALL
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = SMALL
    if "input" in body and body.get("max_output_tokens") is None:
        body["max_output_tokens"] = SMALL
    return body


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]], extra_keys: list[str]) -> Any:
    body = dict(draw(valid))
    how = draw(st.sampled_from(["drop", "retype", "add", "model", "nested", "whole"]))
    keys = sorted(body)
    if how == "drop":
        body.pop(draw(st.sampled_from(keys)))
    elif how == "retype":
        body[draw(st.sampled_from(keys + extra_keys))] = draw(json_values)
    elif how == "add":
        body[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    elif how == "model":
        body["model"] = draw(st.sampled_from(CHAT_MODELS) | json_values)
    elif how == "nested" and isinstance(body.get("messages"), list):
        body["messages"] = draw(st.lists(st.dictionaries(st.text(max_size=10), json_values, max_size=4), max_size=3))
    else:
        return draw(json_values)
    return _bounded(body)


raw_bodies = st.sampled_from(
    [b"", b"{", b"[]", b"null", b'{"model": NaN}', b"\xff\xfe", b'{"model": "tiny", "messages": [', b"0" * 64]
) | st.binary(max_size=64)


def body_strategy(valid: st.SearchStrategy[dict[str, Any]], extra_keys: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(
        valid.map(lambda b: ("json", b)),
        mutated(valid, extra_keys).map(lambda b: ("json", b)),
        raw_bodies.map(lambda b: ("raw", b)),
    )


# -- checking one request ----------------------------------------------------------------------------------------
RESPONSE_SCHEMAS = {
    "/v1/chat/completions": ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    "/v1/completions": ("CreateCompletionResponse", "CreateCompletionStreamResponse"),
    "/v1/embeddings": ("CreateEmbeddingResponse", None),
}


def check(
    client: httpx.Client, validate: Validate, method: str, path: str, kind: str = "none", body: Any = None
) -> int:
    headers = {"Content-Type": "application/json"}
    if kind == "json":
        resp = client.request(method, path, content=json.dumps(body).encode(), headers=headers)
    elif kind == "raw":
        resp = client.request(method, path, content=body, headers=headers)
    else:
        resp = client.request(method, path)
    assert resp.status_code < 500, (method, path, body, resp.status_code, resp.text[:500])
    anthropic_shape = resp.request.url.path.startswith("/v1/messages")
    if resp.status_code >= 400:
        if anthropic_shape:
            AnthropicError.model_validate(resp.json(), strict=True)
        else:
            validate("ErrorResponse", resp.json())
        return resp.status_code
    assert resp.status_code == 200, (path, body, resp.status_code)
    path = resp.request.url.path  # as sent: the client resolves dot segments ("/v1/models/." -> "/v1/models/")
    if path in ("/v1/responses", "/v1/messages"):
        _check_agent_api(validate, path, resp)
    elif resp.headers["content-type"].startswith("text/event-stream"):
        _check_sse(validate, path, resp.text)
    elif path in RESPONSE_SCHEMAS:
        validate(RESPONSE_SCHEMAS[path][0], resp.json())
    elif path.rstrip("/") == "/v1/models":
        validate("ListModelsResponse", resp.json())
    else:
        validate("Model", resp.json())
    return 200


_STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)


def _check_agent_api(validate: Validate, path: str, resp: httpx.Response) -> None:
    """A Responses body or event stream against OpenAI's document; an Anthropic one in the SDK's types."""
    if not resp.headers["content-type"].startswith("text/event-stream"):
        if path == "/v1/responses":
            validate("Response", resp.json())
        else:
            AnthropicMessage.model_validate(resp.json(), strict=True)
        return
    events = [json.loads(line[6:]) for line in resp.text.split("\n") if line.startswith("data: ")]
    assert events, resp.text[-300:]
    for event in events:
        if path == "/v1/responses":
            validate(EVENT_SCHEMAS[event["type"]], event)
        elif event["type"] == "error":
            AnthropicError.model_validate(event, strict=True)
        else:
            _STREAM_EVENT.validate_python(event, strict=True)
    last = events[-1]["type"]
    assert last in ("response.completed", "response.incomplete", "response.failed", "message_stop", "error"), last


def _check_sse(validate: Validate, path: str, text: str) -> None:
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    for data in events[:-1]:
        chunk = json.loads(data)
        validate("ErrorResponse" if "error" in chunk else RESPONSE_SCHEMAS[path][1], chunk)


FUZZ = settings(
    deadline=None,
    database=None,  # no example database written into the repository
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def fuzz(strategy: st.SearchStrategy[Any], examples: int, run: Callable[[Any], int]) -> dict[int, int]:
    """Run `run` on `examples` generated inputs; returns how many answers had each status."""
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=examples)
    @given(strategy)
    def one(value: Any) -> None:
        status = run(value)
        statuses[status] = statuses.get(status, 0) + 1

    one()
    return statuses


@pytest.fixture(scope="module")
def api(stack: Stack) -> httpx.Client:
    with httpx.Client(base_url=stack.api_url, timeout=60) as client:
        yield client
    assert httpx.get(f"{stack.api_url}/health", timeout=5).json()["status"] == "ok"  # still up


TOTAL: dict[str, int] = {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "valid", "extra", "examples"),
    [
        (
            "/v1/chat/completions",
            chat_valid,
            [
                "messages",
                "stop",
                "n",
                "stream_options",
                "response_format",
                "logprobs",
                "top_logprobs",
                "logit_bias",
                "tools",
                "tool_choice",
            ],
            400,
        ),
        ("/v1/completions", completion_valid, ["prompt", "echo", "best_of", "logprobs", "suffix"], 300),
        ("/v1/embeddings", embedding_valid, ["input", "dimensions", "encoding_format"], 150),
        (
            "/v1/responses",
            responses_valid,
            ["input", "text", "tools", "tool_choice", "reasoning", "previous_response_id", "include", "truncation"],
            200,
        ),
        ("/v1/messages", anthropic_valid, ["messages", "system", "tools", "tool_choice", "thinking"], 200),
    ],
)
def test_fuzz_post_endpoints(
    api: httpx.Client, openapi_validate: Validate, path: str, valid: Any, extra: list[str], examples: int
) -> None:
    statuses = fuzz(body_strategy(valid, extra), examples, lambda kb: check(api, openapi_validate, "POST", path, *kb))
    print(f"{path}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    TOTAL[path] = sum(statuses.values())
    assert sum(statuses.values()) >= examples
    assert statuses.get(200, 0) > examples // 10, statuses  # the valid share really was served
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > examples // 10, statuses


@pytest.mark.slow
def test_fuzz_other_routes_and_methods(api: httpx.Client, openapi_validate: Validate, stack: Stack) -> None:
    routes = st.one_of(
        st.tuples(st.just("GET"), st.just("/v1/models")),
        st.tuples(st.just("GET"), st.sampled_from(CHAT_MODELS[:3]) | st.text(min_size=1, max_size=30)).map(
            lambda mp: (mp[0], "/v1/models/" + quote(mp[1], safe=""))
        ),
        st.tuples(
            st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]),
            st.sampled_from(
                ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"]
            ),
        ),
        st.tuples(st.sampled_from(["GET", "DELETE"]), st.text(min_size=1, max_size=30)).map(
            lambda mr: (mr[0], "/v1/responses/" + quote(mr[1], safe=""))
        ),
        st.tuples(st.sampled_from(["GET", "POST"]), st.from_regex(r"\A/v1/[a-z_/]{0,20}\Z")),
    )
    statuses = fuzz(routes, 200, lambda mp: check(api, openapi_validate, *mp))
    print(f"other routes: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    TOTAL["other"] = sum(statuses.values())
    assert sum(statuses.values()) >= 200
    if len(TOTAL) == 6:  # the whole module ran
        assert sum(TOTAL.values()) >= 1400, TOTAL
    assert httpx.get(f"{stack.api_url}/health", timeout=5).json()["status"] == "ok"
