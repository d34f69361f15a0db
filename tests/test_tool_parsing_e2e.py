"""`tool_choice: auto` end to end: a tiny model trained to write Hermes `<tool_call>` blocks, served by a
real worker; its calls come back as OpenAI tool calls, whole and streamed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.api_depth import TOOLS, streamed_tool_calls
from tests.support.stack import Stack
from tests.support.tiny_model import build_tool_caller

PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
TWO = [{"role": "user", "content": "Add 2 and 3, and the weather in Oslo."}]
PARIS_REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TWO_REPLY = (
    '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "fahrenheit"}}\n</tool_call>'
)
MODEL = "tool-caller"


@pytest.fixture(scope="module")
def caller(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    path = build_tool_caller(
        tmp_path_factory.mktemp("tool-caller"), [(PARIS, TOOLS, PARIS_REPLY), (TWO, TOOLS, TWO_REPLY)]
    )
    svc = stack.start_worker("worker-tool-caller", path, "--model-names", MODEL, "--tool-parser", "hermes")
    try:
        stack.wait_models(MODEL)
        yield openai.OpenAI(base_url=stack.base_url, api_key="none", _strict_response_validation=True, max_retries=0)
    finally:
        svc.stop()
        del stack.workers["worker-tool-caller"]


def ask(client: openai.OpenAI, messages: list[dict], **kwargs: object):
    return client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=120, **kwargs
    )


@pytest.mark.slow
def test_auto_reads_a_call_after_some_text(caller: openai.OpenAI) -> None:
    r = ask(caller, PARIS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


@pytest.mark.slow
def test_auto_reads_parallel_calls(caller: openai.OpenAI) -> None:
    calls = ask(caller, TWO).choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"a": 2, "b": 3},
        {"city": "Oslo", "unit": "fahrenheit"},
    ]


@pytest.mark.slow
def test_auto_streams_text_then_call_deltas(caller: openai.OpenAI, stack: Stack, openapi_validate) -> None:
    chunks = list(ask(caller, PARIS, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me check.\n"
    assert "<tool" not in text
    calls, finish = streamed_tool_calls(iter(chunks))
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    body = {"model": MODEL, "messages": TWO, "tools": TOOLS, "temperature": 0, "max_tokens": 120, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    for event in events:
        openapi_validate("CreateChatCompletionStreamResponse", event)
    indexes = [d["index"] for e in events for c in e["choices"] for d in c["delta"].get("tool_calls") or []]
    assert indexes == [0, 1]


@pytest.mark.slow
def test_the_same_model_without_tools_writes_plain_text(caller: openai.OpenAI) -> None:
    r = caller.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=120)
    assert r.choices[0].message.tool_calls is None  # no tools asked for: nothing is parsed
