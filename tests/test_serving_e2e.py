"""End to end over real processes: controller, transformers workers and the API server on loopback,
driven by the official `openai` client with strict response validation."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ALIAS
from tests.support.api_depth import Target, new_target
from tests.support.stack import Stack

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about Beijing."}]


@pytest.fixture(scope="module")
def client(target: Target) -> openai.OpenAI:
    return target.client


@pytest.fixture(scope="module")
def tokenizer(target: Target):
    return target.ref.tokenizer


def test_models_lists_every_name_and_alias(stack: Stack, client: openai.OpenAI, openapi_validate) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"tiny", ALIAS, "all-MiniLM-L6-v2", "tiny-8bit"} <= ids
    body = httpx.get(f"{stack.base_url}/models").json()
    openapi_validate("ListModelsResponse", body)
    assert client.models.retrieve(ALIAS).id == ALIAS


# -- engine-neutral: `tests/test_vllm_e2e.py` runs these against a vLLM worker (its own `target`) ----------
@pytest.fixture(scope="module")
def target(stack: Stack, tiny_model_dir: Path) -> Target:
    return new_target(stack.base_url, "tiny", tiny_model_dir, 2048)


def test_chat_usage_is_exact(target: Target, openapi_validate) -> None:
    r = target.client.chat.completions.create(
        model=target.model, messages=MESSAGES, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt_len = len(target.ref.chat_ids(MESSAGES))
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == prompt_len + 7
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    raw = httpx.post(
        f"{target.base_url}/chat/completions", json={"model": target.model, "messages": MESSAGES, "max_tokens": 3}
    ).json()
    openapi_validate("CreateChatCompletionResponse", raw)


def test_stream_joined_equals_non_stream(target: Target, openapi_validate) -> None:
    kwargs = dict(model=target.model, messages=MESSAGES, max_tokens=40, temperature=0, seed=7)
    whole = target.client.chat.completions.create(**kwargs)
    pieces, usage, finish = [], None, None
    for chunk in target.client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    # every raw SSE chunk is valid against OpenAI's schema
    with httpx.stream(
        "POST",
        f"{target.base_url}/chat/completions",
        json={**kwargs, "stream": True, "stream_options": {"include_usage": True}},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        openapi_validate("CreateChatCompletionStreamResponse", json.loads(line[6:]))


def test_seed_reproducible_and_n_choices_differ(target: Target) -> None:
    kwargs = dict(
        model=target.model,
        messages=MESSAGES,
        max_tokens=24,
        temperature=1.0,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    a = target.client.chat.completions.create(**kwargs)
    b = target.client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    many = target.client.chat.completions.create(**{**kwargs, "n": 3})
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a.choices[0].message.content  # choice i uses seed + i
    assert len({c.message.content for c in many.choices}) == 3
    assert many.usage.completion_tokens == 3 * 24
    streamed = ["", "", ""]
    for chunk in target.client.chat.completions.create(**{**kwargs, "n": 3}, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in many.choices]


def test_stop_string_truncates_stream_and_non_stream(target: Target) -> None:
    base = dict(model=target.model, messages=MESSAGES, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    text = target.client.chat.completions.create(**base).choices[0].message.content
    assert len(text) > 12
    stop = text[8:11]
    expected = text[: text.index(stop)]
    r = target.client.chat.completions.create(**base, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in target.client.chat.completions.create(**base, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == expected


def test_stop_token_ids_penalties_and_max_completion_tokens(target: Target) -> None:
    base = dict(model=target.model, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    r = target.client.chat.completions.create(**base, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    # stop at the first generated token's id: nothing is returned and the reason is "stop"
    first_id = target.ref.greedy_next(target.ref.tokenizer.encode("The cat"))
    r2 = target.client.completions.create(
        model=target.model, prompt="The cat", max_tokens=5, temperature=0, extra_body={"stop_token_ids": [first_id]}
    )
    assert r2.choices[0].finish_reason == "stop" and r2.usage.completion_tokens == 1
    # penalties reach the engine: greedy output that repeats itself changes under a strong penalty
    plain = target.client.chat.completions.create(**base, max_tokens=40).choices[0].message.content
    penalised = target.client.chat.completions.create(
        **base, max_tokens=40, frequency_penalty=2.0, presence_penalty=1.0
    )
    assert penalised.choices[0].message.content != plain
    repeated = target.client.chat.completions.create(
        **{**base, "extra_body": {"ignore_eos": True, "repetition_penalty": 3.0}}, max_tokens=40
    )
    assert repeated.choices[0].message.content != plain


def test_completions_batch_echo_and_stream(target: Target, openapi_validate) -> None:
    client, model = target.client, target.model
    r = client.completions.create(model=model, prompt=["The cat", "北京"], max_tokens=6, n=2, seed=3, temperature=0.8)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    echo = client.completions.create(model=model, prompt="The cat", max_tokens=4, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("The cat")
    raw = httpx.post(f"{target.base_url}/completions", json={"model": model, "prompt": "hi", "max_tokens": 3}).json()
    openapi_validate("CreateCompletionResponse", raw)
    whole = client.completions.create(model=model, prompt="The cat", max_tokens=12, temperature=0)
    # openai's own Completion type says finish_reason is never null, yet OpenAI streams null until the last
    # chunk; the raw chunks are checked against the OpenAPI document instead (see below)
    chunks = list(
        target.lenient.completions.create(
            model=model,
            prompt="The cat",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream(
        "POST", f"{target.base_url}/completions", json={"model": model, "prompt": "hi", "max_tokens": 5, "stream": True}
    ) as resp:
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        openapi_validate("CreateCompletionStreamResponse", json.loads(line))


def test_context_overflow_is_400(target: Target) -> None:
    long = [{"role": "user", "content": "word " * (target.context + 100)}]
    with pytest.raises(openai.BadRequestError) as err:
        target.client.chat.completions.create(model=target.model, messages=long)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        target.client.chat.completions.create(model=target.model, messages=MESSAGES, max_tokens=target.context)
    assert err.value.param == "max_tokens"


def test_unicode_line_separators_survive_the_stream(target: Target) -> None:
    prompt = "a\u2028b\u2029c\x85d\re"  # JSON leaves these unescaped; they must not split stream lines
    r = target.client.completions.create(model=target.model, prompt=prompt, max_tokens=2, echo=True, temperature=0)
    assert r.choices[0].text.startswith(prompt)
    # in SSE they are escaped, so that even readers splitting like str.splitlines (httpx's iter_lines) see
    # one line per event
    body = {"model": target.model, "prompt": prompt, "max_tokens": 2, "echo": True, "stream": True}
    with httpx.stream("POST", f"{target.base_url}/completions", json=body) as resp:
        data = [line[6:] for line in resp.iter_lines() if line]
    assert data[-1] == "[DONE]"
    text = "".join(c["text"] for c in map(json.loads, data[:-1]) for c in c["choices"])
    assert text.startswith(prompt)


ENGINE_NEUTRAL = [
    "test_chat_usage_is_exact",
    "test_stream_joined_equals_non_stream",
    "test_seed_reproducible_and_n_choices_differ",
    "test_stop_string_truncates_stream_and_non_stream",
    "test_stop_token_ids_penalties_and_max_completion_tokens",
    "test_completions_batch_echo_and_stream",
    "test_context_overflow_is_400",
    "test_unicode_line_separators_survive_the_stream",
]


# -- this stack's other workers and the tutorial ----------------------------------------------------------------
def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embeddings_rank_paraphrase_above_unrelated(stack: Stack, client: openai.OpenAI, openapi_validate) -> None:
    texts = ["A man is playing a guitar.", "Someone strums a guitar.", "The stock market fell sharply today."]
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    vecs = [d.embedding for d in r.data]
    # the openai client asks for base64 unless told otherwise (its strict mode cannot parse that, so lenient)
    lenient = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0)
    default = lenient.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    assert max(abs(x - y) for x, y in zip(default.data[0].embedding, vecs[0], strict=True)) < 1e-6
    assert len(vecs[0]) == 384
    assert all(abs(math.sqrt(_cos(v, v)) - 1) < 1e-4 for v in vecs)
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.2
    assert r.usage.prompt_tokens > 0
    raw = httpx.post(f"{stack.base_url}/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts[0]}).json()
    openapi_validate("CreateEmbeddingResponse", raw)
    b64 = httpx.post(
        f"{stack.base_url}/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": texts[0], "encoding_format": "base64"},
    ).json()
    decoded = struct.unpack("<384f", base64.b64decode(b64["data"][0]["embedding"]))
    assert max(abs(x - y) for x, y in zip(decoded, vecs[0], strict=True)) < 1e-6
    # long input: chunked by default, still one normalised vector
    long = client.embeddings.create(model="all-MiniLM-L6-v2", input="guitar music " * 400, encoding_format="float")
    assert abs(math.sqrt(_cos(long.data[0].embedding, long.data[0].embedding)) - 1) < 1e-4


def test_chat_model_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="tiny", input=["hello world", "你好"], encoding_format="float")
    assert len(r.data) == 2 and len(r.data[0].embedding) == 128


def test_load_8bit_worker_serves(client: openai.OpenAI, stack: Stack) -> None:
    log = stack.workers["worker-8bit"][0].log_text()
    assert "8-bit" in log
    r = client.chat.completions.create(
        model="tiny-8bit", messages=MESSAGES, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].message.content


def test_client_disconnect_aborts_generation(stack: Stack) -> None:
    before = stack.worker_health("worker-tiny")["generated_tokens"]
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body, timeout=30) as resp:
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stack.worker_health("worker-tiny")["running"]:
        time.sleep(0.05)
    health = stack.worker_health("worker-tiny")
    assert health["running"] == 0
    time.sleep(0.5)
    generated = stack.worker_health("worker-tiny")["generated_tokens"] - before
    assert generated < 1900, f"generation was not aborted ({generated} tokens)"


def test_langchain_tutorial_check(stack: Stack) -> None:
    from langchain_core.prompts import PromptTemplate
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        streaming=True, api_key="none", base_url=stack.base_url, model=ALIAS, max_tokens=16,
        temperature=0, extra_body={"ignore_eos": True},  # the random test model may otherwise stop at once
    )  # fmt: skip
    prompt = PromptTemplate.from_template("我很想去{location}旅行，我应该在哪里做什么？")
    chunks = list((prompt | llm).stream({"location": "北京"}))
    assert chunks and any(c.content for c in chunks)
    reply = (prompt | llm).invoke({"location": "上海"})
    assert isinstance(reply.content, str) and reply.content


def test_worker_token_count_and_details(stack: Stack, tokenizer) -> None:
    url = stack.workers["worker-tiny"][1]
    details = httpx.get(f"{url}/model_details").json()
    assert details["context_length"] == 2048 and details["kind"] == "chat" and ALIAS in details["model_names"]
    count = httpx.post(f"{url}/count_tokens", json={"prompt": "北京 is big"}).json()["count"]
    assert count == len(tokenizer.encode("北京 is big"))
