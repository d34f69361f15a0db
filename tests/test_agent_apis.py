"""The APIs agents speak, end to end with their own clients: OpenAI's Responses API (`openai`'s
`client.responses`), Anthropic's Messages API (`anthropic`'s `client.messages`), the OpenAI Agents SDK
running a one-tool agent, and a thinking model's reasoning in all of them and in Chat Completions.

A tiny model trained at test time (`tests/support/agent_apis.py`) writes the tool calls and `<think>`
blocks; its worker reads reasoning with `--reasoning-parser qwen3`.  Every Responses body and event is
validated against OpenAI's OpenAPI document; Anthropic bodies parse in the `anthropic` SDK's strict
types.  Every test here runs again against a vLLM worker (`tests/test_vllm_e2e.py`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled
from anthropic.types import Message as AnthropicMessage
from anthropic.types import RawMessageStreamEvent
from openai import AsyncOpenAI
from pydantic import TypeAdapter

from tests.support.agent_apis import (
    AGENT_INSTRUCTIONS,
    EVENT_SCHEMAS,
    MODEL,
    OSLO,
    OSLO_ANSWER,
    OSLO_REASONING,
    PARIS,
    PARIS_ANSWER,
    PARIS_ARGS,
    PARIS_RESULT,
    PARIS_TEXT,
    SUM,
    SUM_REASONING,
    TOKYO,
    TOKYO_ANSWER,
    AgentTarget,
    get_weather,
)
from tests.support.api_depth import SCHEMAS, TOOLS
from tests.support.stack import Stack

RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
GREEDY = {"temperature": 0, "max_output_tokens": 120}
# the newest anthropic SDKs have no sampling parameters: sent as extra body fields, as older clients send them
A_GREEDY = {"max_tokens": 120, "extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def agent_target(stack: Stack, agent_model_dir: Path) -> Iterator[AgentTarget]:
    """The trained model on a transformers worker, behind the session's API server."""
    svc = stack.start_worker("worker-agent", agent_model_dir, "--model-names", MODEL, "--reasoning-parser", "qwen3")
    try:
        stack.wait_models(MODEL)
        yield AgentTarget(stack.api_url)
    finally:
        svc.stop()
        del stack.workers["worker-agent"]


# -- helpers ----------------------------------------------------------------------------------------------
def sse_events(resp: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in resp.text.split("\n\n"):
        lines = block.splitlines()
        name = next((line[7:] for line in lines if line.startswith("event: ")), "")
        data = next((line[6:] for line in lines if line.startswith("data: ")), None)
        if data is not None:
            out.append((name, json.loads(data)))
    return out


def post(target: AgentTarget, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{target.api_url}{path}", json=body, timeout=60)


def check_response_events(events: list[tuple[str, dict[str, Any]]], validate: Any) -> dict[str, Any]:
    """Every event valid against its OpenAPI schema, named by its type, numbered in order, items opened
    and closed in order; returns the final response."""
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert events[0][1]["type"] == "response.created" and events[1][1]["type"] == "response.in_progress"
    opened: list[int] = []
    for name, event in events:
        assert name == event["type"]
        validate(EVENT_SCHEMAS[event["type"]], event)
        if event["type"] == "response.output_item.added":
            assert not opened or opened[-1] == -1, "an item opened before the previous one closed"
            opened.append(event["output_index"])
        elif event["type"] == "response.output_item.done":
            assert opened and opened[-1] == event["output_index"]
            opened.append(-1)
    final = events[-1][1]
    assert final["type"] in ("response.completed", "response.incomplete")
    validate("Response", final["response"])
    return final["response"]


def calls_of(output: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(item.name, json.loads(item.arguments)) for item in output if item.type == "function_call"]


# -- Responses --------------------------------------------------------------------------------------------
def test_responses_function_call(agent_target: AgentTarget, openapi_validate) -> None:
    r = agent_target.openai.responses.create(model=MODEL, input=PARIS, tools=RESPONSES_TOOLS, **GREEDY)
    assert r.status == "completed" and r.output_text == PARIS_TEXT
    assert [item.type for item in r.output] == ["message", "function_call"]
    assert calls_of(r.output) == [("get_weather", PARIS_ARGS)]
    assert r.output[1].call_id.startswith("call_") and r.output[1].status == "completed"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0 and r.tools[0].name == "get_weather"
    raw = post(agent_target, "/v1/responses", {"model": MODEL, "input": PARIS, "tools": RESPONSES_TOOLS, **GREEDY})
    assert raw.status_code == 200
    openapi_validate("Response", raw.json())


def test_responses_second_turn_through_previous_response_id(agent_target: AgentTarget, openapi_validate) -> None:
    client = agent_target.openai
    first = client.responses.create(model=MODEL, input=PARIS, tools=RESPONSES_TOOLS, **GREEDY)
    call = next(item for item in first.output if item.type == "function_call")
    output = [{"type": "function_call_output", "call_id": call.call_id, "output": PARIS_RESULT}]
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=output, tools=RESPONSES_TOOLS, **GREEDY
    )
    assert second.output_text == PARIS_ANSWER and second.previous_response_id == first.id
    stored = client.responses.retrieve(second.id)
    assert stored.id == second.id and stored.output_text == PARIS_ANSWER
    openapi_validate("Response", httpx.get(f"{agent_target.base_url}/responses/{second.id}").json())
    # the same conversation sent whole, without the store, gets the same answer
    whole = [
        {"role": "user", "content": PARIS},
        *[item.model_dump(exclude_none=True) for item in first.output],
        *output,
    ]
    again = client.responses.create(model=MODEL, input=whole, tools=RESPONSES_TOOLS, store=False, **GREEDY)
    assert again.output_text == PARIS_ANSWER
    assert httpx.get(f"{agent_target.base_url}/responses/{again.id}").status_code == 404  # store: false


def test_responses_stream_events(agent_target: AgentTarget, openapi_validate) -> None:
    body = {"model": MODEL, "input": PARIS, "tools": RESPONSES_TOOLS, "stream": True, **GREEDY}
    events = sse_events(post(agent_target, "/v1/responses", body))
    final = check_response_events(events, openapi_validate)
    types = [e["type"] for _, e in events]
    assert types.count("response.output_text.delta") >= 1 and "response.function_call_arguments.delta" in types
    text = "".join(e["delta"] for _, e in events if e["type"] == "response.output_text.delta")
    args = "".join(e["delta"] for _, e in events if e["type"] == "response.function_call_arguments.delta")
    assert text == PARIS_TEXT and json.loads(args) == PARIS_ARGS
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    # the SDK reads the same stream: raw events, and its stream helper's final response
    streamed = list(
        agent_target.openai.responses.create(model=MODEL, input=PARIS, tools=RESPONSES_TOOLS, stream=True, **GREEDY)
    )
    assert streamed[-1].type == "response.completed" and calls_of(streamed[-1].response.output) == [
        ("get_weather", PARIS_ARGS)
    ]
    with agent_target.openai.responses.stream(model=MODEL, input=PARIS, tools=RESPONSES_TOOLS, **GREEDY) as stream:
        done = stream.get_final_response()
    assert done.output_text == PARIS_TEXT and calls_of(done.output) == [("get_weather", PARIS_ARGS)]


def test_responses_json_schema_format(agent_target: AgentTarget, openapi_validate) -> None:
    text = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMAS["person"], "strict": True}}
    r = agent_target.openai.responses.create(
        model=MODEL, input="Who are you?", text=text, max_output_tokens=120, temperature=0
    )
    assert r.text.format.type == "json_schema"
    if r.status == "incomplete":  # the random model wrote an endless integer (the schema allows one): cut
        assert r.incomplete_details.reason == "max_output_tokens" and r.output_text.startswith('{"name":')
    else:
        jsonschema.validate(json.loads(r.output_text), SCHEMAS["person"])
    # greedy as above: the stream writes the same text
    body = {"model": MODEL, "input": "Who are you?", "text": text, "max_output_tokens": 120, "stream": True,
            "temperature": 0}  # fmt: skip
    final = check_response_events(sse_events(post(agent_target, "/v1/responses", body)), openapi_validate)
    assert final["output"][0]["content"][0]["text"] == r.output_text


def test_responses_reasoning_items(agent_target: AgentTarget, openapi_validate) -> None:
    client = agent_target.openai
    oslo = client.responses.create(model=MODEL, input=OSLO, **GREEDY)
    assert [item.type for item in oslo.output] == ["reasoning", "message"]
    assert oslo.output[0].content[0].text == OSLO_REASONING and oslo.output_text == OSLO_ANSWER
    assert 0 < oslo.usage.output_tokens_details.reasoning_tokens < oslo.usage.output_tokens
    # reasoning, then a call
    r = client.responses.create(model=MODEL, input=SUM, tools=RESPONSES_TOOLS, **GREEDY)
    assert [item.type for item in r.output] == ["reasoning", "function_call"]
    assert r.output[0].content[0].text == SUM_REASONING and calls_of(r.output) == [("add", {"a": 2, "b": 3})]
    events = sse_events(post(agent_target, "/v1/responses", {"model": MODEL, "input": OSLO, "stream": True, **GREEDY}))
    final = check_response_events(events, openapi_validate)
    thought = "".join(e["delta"] for _, e in events if e["type"] == "response.reasoning_text.delta")
    assert thought == OSLO_REASONING and final["output"][1]["content"][0]["text"] == OSLO_ANSWER
    # a reasoning item is part of the conversation it continues (the template renders it)
    follow = client.responses.create(model=MODEL, previous_response_id=oslo.id, input="And now?", max_output_tokens=1)
    without = [
        {"role": "user", "content": OSLO},
        {"role": "assistant", "content": OSLO_ANSWER},
        {"role": "user", "content": "And now?"},
    ]
    unreasoned = client.responses.create(model=MODEL, input=without, max_output_tokens=1)
    assert follow.usage.input_tokens > unreasoned.usage.input_tokens


# -- Chat Completions: reasoning under both names, template variables ------------------------------------------
def test_chat_returns_reasoning_under_both_names(agent_target: AgentTarget, openapi_validate) -> None:
    client = agent_target.openai
    messages = [{"role": "user", "content": OSLO}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=120)
    message = r.choices[0].message
    assert message.content == OSLO_ANSWER
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == OSLO_REASONING
    deltas = list(
        client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=120, stream=True)
    )
    extra = [c.choices[0].delta.model_extra for c in deltas if c.choices]
    assert "".join(e.get("reasoning_content") or "" for e in extra) == OSLO_REASONING
    assert "".join(e.get("reasoning") or "" for e in extra) == OSLO_REASONING
    assert "".join(c.choices[0].delta.content or "" for c in deltas if c.choices) == OSLO_ANSWER
    raw = post(agent_target, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 8})
    openapi_validate("CreateChatCompletionResponse", raw.json())


def test_template_variables_reach_the_template(agent_target: AgentTarget) -> None:
    client = agent_target.openai

    def prompt_tokens(messages: list[dict[str, Any]], **extra: Any) -> int:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, **extra)
        return r.usage.prompt_tokens

    question = [{"role": "user", "content": OSLO}]
    plain = prompt_tokens(question)
    assert prompt_tokens(question, extra_body={"chat_template_kwargs": {"enable_thinking": False}}) > plain
    assert prompt_tokens(question, reasoning_effort="high") > plain
    # an assistant turn's reasoning is accepted under either name and rendered the same way
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *question]
    with_content = [dict(m) for m in earlier]
    with_content[1]["reasoning_content"] = "greet back"
    with_reasoning = [dict(m) for m in earlier]
    with_reasoning[1]["reasoning"] = "greet back"
    assert prompt_tokens(with_content) == prompt_tokens(with_reasoning) > prompt_tokens(earlier)


# -- Anthropic Messages ----------------------------------------------------------------------------------------
def test_anthropic_text_tools_and_tool_results(agent_target: AgentTarget) -> None:
    client = agent_target.anthropic
    ask = [{"role": "user", "content": PARIS}]
    first = client.messages.create(model=MODEL, **A_GREEDY, messages=ask, tools=ANTHROPIC_TOOLS)
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["text", "tool_use"]
    text, call = first.content
    assert text.text == PARIS_TEXT and call.name == "get_weather" and call.input == PARIS_ARGS
    assert call.id.startswith("toolu_") and first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    result = {"type": "tool_result", "tool_use_id": call.id, "content": PARIS_RESULT}
    turns = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [result]},
    ]
    second = client.messages.create(model=MODEL, **A_GREEDY, messages=turns, tools=ANTHROPIC_TOOLS)
    assert second.stop_reason == "end_turn" and second.content[0].text == PARIS_ANSWER
    # stop sequences end the text and say which one matched
    stopped = client.messages.create(
        model=MODEL, **A_GREEDY, messages=turns, tools=ANTHROPIC_TOOLS, stop_sequences=["sunny"]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "sunny"
    assert stopped.content[0].text == PARIS_ANSWER[: PARIS_ANSWER.index("sunny")]
    raw = post(agent_target, "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": ask})
    AnthropicMessage.model_validate(raw.json(), strict=True)


def test_anthropic_stream(agent_target: AgentTarget) -> None:
    client = agent_target.anthropic
    ask = [{"role": "user", "content": PARIS}]
    with client.messages.stream(model=MODEL, **A_GREEDY, messages=ask, tools=ANTHROPIC_TOOLS) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    whole = client.messages.create(model=MODEL, **A_GREEDY, messages=ask, tools=ANTHROPIC_TOOLS)
    assert text == PARIS_TEXT and final.stop_reason == "tool_use"
    assert [b.model_dump(exclude={"id"}) for b in final.content] == [
        b.model_dump(exclude={"id"}) for b in whole.content
    ]

    def prompt(usage: Any) -> int:  # Anthropic counts cache reads apart from input_tokens
        return usage.input_tokens + (usage.cache_read_input_tokens or 0)

    assert prompt(final.usage) == prompt(whole.usage) and final.usage.output_tokens == whole.usage.output_tokens
    body = {
        "model": MODEL,
        "max_tokens": 120,
        "temperature": 0,
        "messages": [{"role": "user", "content": OSLO}],
        "stream": True,
    }
    events = sse_events(post(agent_target, "/v1/messages", body))
    adapter = TypeAdapter(RawMessageStreamEvent)
    for name, event in events:
        assert name == event["type"]
        adapter.validate_python(event, strict=True)
    kinds = [e["type"] for _, e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    deltas = [e["delta"] for _, e in events if e["type"] == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == OSLO_REASONING
    assert "".join(d.get("text", "") for d in deltas) == OSLO_ANSWER


def test_anthropic_thinking_and_count_tokens(agent_target: AgentTarget) -> None:
    client = agent_target.anthropic
    ask = [{"role": "user", "content": OSLO}]
    r = client.messages.create(
        model=MODEL, **A_GREEDY, messages=ask, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == OSLO_REASONING and r.content[1].text == OSLO_ANSWER
    counted = client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": PARIS}], tools=ANTHROPIC_TOOLS
    )
    tokenized = post(
        agent_target, "/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": PARIS}], "tools": TOOLS}
    )
    assert counted.input_tokens == tokenized.json()["count"] > 100  # the tool definitions are in the prompt
    first = client.messages.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": PARIS}], tools=ANTHROPIC_TOOLS
    )
    assert first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0) == counted.input_tokens


# -- usage: the prompt tokens the prefix cache supplied ----------------------------------------------------
CACHE_RULES = " ".join(f"Rule {i}: answer in plain words, keep to the facts, name your sources." for i in range(30))


def test_usage_reports_the_prompt_tokens_the_prefix_cache_supplied(agent_target: AgentTarget, openapi_validate) -> None:
    """Each API says how much of the prompt came from the engine's prefix cache, in its own field: Chat
    Completions `prompt_tokens_details.cached_tokens` (part of prompt_tokens), Responses
    `input_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens` (apart from input_tokens)."""
    system = f"Session {uuid.uuid4().hex}. {CACHE_RULES}"  # never seen: the first request finds nothing cached
    messages = [{"role": "system", "content": system}, {"role": "user", "content": OSLO}]
    client = agent_target.openai
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    prompt = first.usage.prompt_tokens
    assert prompt > 300  # longer than two of vLLM's 128-token CPU blocks
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens < 8  # at most the template's opening, as every chat's
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens == prompt and prompt // 2 <= cached < prompt  # the last token is computed
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens == prompt and chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    raw = post(agent_target, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    openapi_validate("CreateChatCompletionResponse", raw.json())
    assert raw.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": cached}
    body = {"model": MODEL, "instructions": system, "input": OSLO, "max_output_tokens": 16, "temperature": 0}
    raw = post(agent_target, "/v1/responses", body)
    openapi_validate("Response", raw.json())
    usage = raw.json()["usage"]
    assert usage["input_tokens"] // 2 <= usage["input_tokens_details"]["cached_tokens"] < usage["input_tokens"]
    ask = {"model": MODEL, "system": system, "messages": [{"role": "user", "content": OSLO}]}
    a = agent_target.anthropic.messages.create(max_tokens=2, **ask)
    whole = agent_target.anthropic.messages.count_tokens(**ask).input_tokens
    assert a.usage.cache_read_input_tokens is not None and whole // 2 <= a.usage.cache_read_input_tokens < whole
    assert a.usage.input_tokens + a.usage.cache_read_input_tokens == whole


# -- the OpenAI Agents SDK -------------------------------------------------------------------------------------
def test_agents_sdk_runs_a_one_tool_agent(agent_target: AgentTarget) -> None:
    set_tracing_disabled(True)  # no traces sent anywhere
    client = AsyncOpenAI(base_url=agent_target.base_url, api_key="none", max_retries=0)
    agent = Agent(
        name="weather",
        instructions=AGENT_INSTRUCTIONS,
        tools=[get_weather],
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(temperature=0),
    )
    result = Runner.run_sync(agent, TOKYO, max_turns=4)
    assert result.final_output == TOKYO_ANSWER
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"], kinds
    assert result.new_items[1].output == "rainy, 18 C"
