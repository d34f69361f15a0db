"""Logprobs, structured output (JSON mode, JSON schema) and tool calls, end to end through the `openai`
client against the transformers engine.  `tests/test_vllm_e2e.py` runs the same tests against a vLLM
worker (its own `target` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.support.api_depth import (
    ADD,
    MESSAGES,
    SCHEMAS,
    TOOLS,
    WEATHER,
    Target,
    chat,
    check_against_reference,
    check_call,
    check_top_logprobs,
    json_schema_format,
    new_target,
    streamed_tool_calls,
)
from tests.support.stack import Stack


@pytest.fixture(scope="module")
def target(stack: Stack, tiny_model_dir: Path) -> Target:
    return new_target(stack.base_url, "tiny", tiny_model_dir, 2048)


# -- logprobs ---------------------------------------------------------------------------------------------
def test_chat_logprobs_match_a_reference_forward_pass(target: Target, openapi_validate) -> None:
    r = chat(target.client, target.model, logprobs=True, top_logprobs=5, temperature=1.0, max_tokens=12)
    entries = [e.model_dump() for e in r.choices[0].logprobs.content]
    assert len(entries) == r.usage.completion_tokens
    check_top_logprobs(entries, 5)
    check_against_reference(target.ref, MESSAGES, entries)
    if r.choices[0].finish_reason == "length":  # no stop token: the tokens spell the text exactly
        assert "".join(e["token"] for e in entries) == r.choices[0].message.content
    raw = httpx.post(
        f"{target.base_url}/chat/completions",
        json={"model": target.model, "messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
    ).json()
    openapi_validate("CreateChatCompletionResponse", raw)


def test_chat_logprobs_streamed_equal_non_streamed(target: Target, openapi_validate) -> None:
    kwargs = {"logprobs": True, "top_logprobs": 3, "temperature": 0.8, "max_tokens": 10, "seed": 11}
    whole = chat(target.client, target.model, **kwargs)
    streamed = []
    text = ""
    for chunk in chat(target.client, target.model, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                streamed += [e.model_dump() for e in choice.logprobs.content or []]
    assert text == whole.choices[0].message.content
    assert [e["token"] for e in streamed] == [e.token for e in whole.choices[0].logprobs.content]
    for a, b in zip(streamed, whole.choices[0].logprobs.content, strict=True):
        assert a["logprob"] == pytest.approx(b.logprob, abs=1e-4)
    with httpx.stream(
        "POST",
        f"{target.base_url}/chat/completions",
        json={"model": target.model, "messages": MESSAGES, "stream": True, **kwargs},
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                openapi_validate("CreateChatCompletionStreamResponse", json.loads(line[6:]))


def test_greedy_logprobs_are_the_unscaled_distribution(target: Target) -> None:
    r = chat(target.client, target.model, logprobs=True, top_logprobs=1, temperature=0, max_tokens=6)
    entries = [e.model_dump() for e in r.choices[0].logprobs.content]
    for e in entries:  # greedy picks the most likely token
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"], abs=1e-5)
    check_against_reference(target.ref, MESSAGES, entries)


def test_completion_logprobs_with_echo(target: Target, openapi_validate) -> None:
    prompt = "The model answers the request"
    # the client's strict mode, like OpenAI's schema, has no null for the first echoed token (the API sends one)
    r = target.lenient.completions.create(
        model=target.model, prompt=prompt, max_tokens=5, logprobs=3, echo=True, temperature=1.0, seed=3
    )
    lp = r.choices[0].logprobs
    prompt_ids = target.ref.tokenizer.encode(prompt)
    n_prompt = len(prompt_ids)
    assert len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # the prompt's own scores are the reference model's
    expected = target.ref.logprobs(prompt_ids[:1], prompt_ids[1:])
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(expected, abs=2e-3)
    assert r.choices[0].text.startswith(prompt)
    for echo in (False, True):
        raw = httpx.post(
            f"{target.base_url}/completions",
            json={"model": target.model, "prompt": prompt, "max_tokens": 2, "logprobs": 2, "echo": echo},
        ).json()
        openapi_validate("CreateCompletionResponse", raw)
        assert len(raw["choices"][0]["logprobs"]["tokens"]) == raw["usage"]["completion_tokens"] + echo * n_prompt


def test_logit_bias_forces_and_forbids_tokens(target: Target) -> None:
    token = target.ref.tokenizer.encode(" model", add_special_tokens=False)[0]
    forced = chat(target.client, target.model, temperature=0, max_tokens=4, logit_bias={str(token): 100})
    assert forced.choices[0].message.content == target.ref.tokenizer.decode([token] * 4)
    plain = chat(target.client, target.model, temperature=0, max_tokens=1, logprobs=True)
    first = target.ref.token_id(plain.choices[0].logprobs.content[0].model_dump())
    banned = chat(
        target.client, target.model, temperature=0, max_tokens=1, logprobs=True, logit_bias={str(first): -100}
    )
    assert target.ref.token_id(banned.choices[0].logprobs.content[0].model_dump()) != first
    with pytest.raises(openai.BadRequestError) as err:
        chat(target.client, target.model, max_tokens=1, logit_bias={"99999999": 5})
    assert err.value.body["param"] == "logit_bias"


def test_seed_reproduces_on_this_engine(target: Target) -> None:
    runs = [chat(target.client, target.model, temperature=1.2, max_tokens=16, seed=123) for _ in range(2)]
    assert runs[0].choices[0].message.content == runs[1].choices[0].message.content


# -- structured output ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates(target: Target, name: str) -> None:
    r = chat(target.client, target.model, response_format=json_schema_format(name), temperature=1.0, max_tokens=400)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[name])


@pytest.mark.parametrize("name", ["person", "list"])
def test_json_schema_streamed(target: Target, name: str) -> None:
    text = "".join(
        c.choices[0].delta.content or ""
        for c in chat(
            target.client, target.model, response_format=json_schema_format(name), max_tokens=400, stream=True
        )
        if c.choices
    )
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_mode_gives_an_object(target: Target) -> None:
    # a random model writes endless keys in free-form JSON; whenever it does end, the grammar made it an object
    r = chat(target.client, target.model, response_format={"type": "json_object"}, seed=1, n=8, max_tokens=400)
    ended = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert ended, [c.message.content[:80] for c in r.choices]
    for text in ended:
        assert isinstance(json.loads(text), dict)
    for c in r.choices:
        assert c.message.content.startswith("{")


def test_structured_output_with_n_and_greedy_tail(target: Target) -> None:
    r = chat(target.client, target.model, response_format=json_schema_format("mood"), n=3, max_tokens=200)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS["mood"])


def test_invalid_schema_is_a_400(target: Target) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as err:
        chat(target.client, target.model, response_format=bad, max_tokens=5)
    assert err.value.body["param"] == "response_format"


# -- tools -----------------------------------------------------------------------------------------------------
def test_named_tool_choice_returns_a_valid_call(target: Target, openapi_validate) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(target.client, target.model, tools=TOOLS, tool_choice=choice)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    check_call("get_weather", calls[0].function.arguments)
    raw = httpx.post(
        f"{target.base_url}/chat/completions",
        json={"model": target.model, "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "max_tokens": 256},
    ).json()
    openapi_validate("CreateChatCompletionResponse", raw)
    streamed, finish = streamed_tool_calls(
        chat(target.client, target.model, tools=TOOLS, tool_choice=choice, stream=True)
    )
    assert finish == "tool_calls" and list(streamed) == [0]
    assert streamed[0]["name"] == "get_weather" and streamed[0]["id"].startswith("call_")
    check_call("get_weather", streamed[0]["arguments"])


def test_required_tool_choice_returns_valid_calls(target: Target, openapi_validate) -> None:
    for seed in (1, 2, 3):
        r = chat(target.client, target.model, tools=TOOLS, tool_choice="required", seed=seed)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message.content
        calls = r.choices[0].message.tool_calls
        assert calls
        for call in calls:
            check_call(call.function.name, call.function.arguments)
        assert len({c.id for c in calls}) == len(calls)
    one = chat(target.client, target.model, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=5)
    assert len(one.choices[0].message.tool_calls) == 1
    streamed, finish = streamed_tool_calls(
        chat(target.client, target.model, tools=TOOLS, tool_choice="required", stream=True, seed=4)
    )
    assert finish == "tool_calls" and streamed
    for call in streamed.values():
        check_call(call["name"], call["arguments"])
    with httpx.stream(
        "POST",
        f"{target.base_url}/chat/completions",
        json={
            "model": target.model,
            "messages": MESSAGES,
            "tools": TOOLS,
            "tool_choice": "required",
            "stream": True,
            "max_tokens": 256,
        },
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                openapi_validate("CreateChatCompletionStreamResponse", json.loads(line[6:]))


@pytest.mark.parametrize("max_tokens", [1, 4, 9])
def test_forced_tool_calls_cut_off_by_max_tokens_are_still_tool_calls(target: Target, max_tokens: int) -> None:
    """A client that forced a call gets one even when max_tokens ends it early: finish_reason length, the
    call's arguments as far as they got, never half a JSON array as content."""
    named = {"type": "function", "function": {"name": "add"}}
    for choice, name in (("required", None), (named, "add")):
        r = chat(target.client, target.model, tools=TOOLS, tool_choice=choice, max_tokens=max_tokens, seed=3)
        choice0 = r.choices[0]
        assert choice0.finish_reason == "length" and not choice0.message.content, choice0
        calls = choice0.message.tool_calls
        assert calls and all(c.function.name in ("get_weather", "add") for c in calls), calls
        assert name is None or calls[0].function.name == name
        streamed, finish = streamed_tool_calls(
            chat(
                target.client, target.model, tools=TOOLS, tool_choice=choice, max_tokens=max_tokens, seed=3, stream=True
            )
        )
        assert finish == "length" and [c["name"] for c in streamed.values()] == [c.function.name for c in calls]


def test_tokenize_and_detokenize_match_the_tokenizer(target: Target) -> None:
    tokenizer = target.ref.tokenizer
    text = "The cat sat on the mat. 北京"
    r = httpx.post(
        f"{target.api_url}/tokenize", json={"model": target.model, "prompt": text, "return_token_strs": True}
    )
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == target.context
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    plain = httpx.post(
        f"{target.api_url}/tokenize", json={"model": target.model, "prompt": text, "add_special_tokens": False}
    )
    assert (
        plain.json()["tokens"] == tokenizer.encode(text, add_special_tokens=False)
        and plain.json()["token_strs"] is None
    )
    chat_body = {"model": target.model, "messages": MESSAGES, "tools": TOOLS}
    chat_ids = httpx.post(f"{target.api_url}/tokenize", json=chat_body).json()["tokens"]
    assert chat_ids == target.ref.chat_ids(MESSAGES, tools=TOOLS)  # rendered as generation renders it
    back = httpx.post(f"{target.api_url}/detokenize", json={"model": target.model, "tokens": body["tokens"]})
    assert back.json() == {"prompt": tokenizer.decode(body["tokens"], skip_special_tokens=True)}


def test_two_turn_tool_conversation(target: Target) -> None:
    first = chat(target.client, target.model, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    args = check_call(call.function.name, call.function.arguments)
    messages = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, **args})},
    ]
    second = chat(target.client, target.model, messages=messages, tools=[WEATHER], max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the model saw the call and its result through its own chat template
    template_messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": messages[-1]["content"]},
    ]
    expected = target.ref.chat_ids(template_messages, tools=[WEATHER])
    assert second.usage.prompt_tokens == len(expected)
    assert "<tool_response>" in target.ref.tokenizer.decode(expected)


def test_auto_tool_choice_renders_tools(target: Target) -> None:
    r = chat(target.client, target.model, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(target.ref.chat_ids(MESSAGES, tools=TOOLS))
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = chat(target.client, target.model, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert none.usage.prompt_tokens == len(target.ref.chat_ids(MESSAGES))
    assert none.choices[0].message.tool_calls is None


def test_unsupported_combinations_name_the_parameter(target: Target) -> None:
    cases = [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [ADD, ADD]}, "tools"),
        ({"functions": [ADD["function"]]}, "functions"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ]
    for extra, param in cases:
        resp = httpx.post(
            f"{target.base_url}/chat/completions",
            json={"model": target.model, "messages": MESSAGES, "max_tokens": 2, **extra},
        )
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"] == param, (extra, resp.text)


# -- LangChain ----------------------------------------------------------------------------------------------------
def test_langchain_bind_tools_and_structured_output(target: Target) -> None:
    from typing import Literal

    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class WeatherQuery(BaseModel):
        city: str = Field(max_length=16)
        unit: Literal["celsius", "fahrenheit"]

    @tool(args_schema=WeatherQuery)
    def get_weather(city: str, unit: str) -> str:
        """Current weather for a city."""
        return f"21 {unit} in {city}"

    llm = ChatOpenAI(model=target.model, base_url=target.base_url, api_key="none", max_tokens=256, seed=7)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Beijing?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert set(msg.tool_calls[0]["args"]) == {"city", "unit"}
    forced = llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Beijing?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "get_weather"

    class Answer(BaseModel):
        city: str = Field(max_length=12)
        sunny: bool
        score: int

    structured = llm.with_structured_output(Answer).invoke("Describe the weather in Beijing as JSON.")
    assert isinstance(structured, Answer)
