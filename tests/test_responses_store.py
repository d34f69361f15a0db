"""Stored responses: the SQLite store itself (one writer, WAL, retention by count and age, writes seen
before they are committed), and through a real API server: they survive a restart, `previous_response_id`
continues them, DELETE removes them, and each belongs to the API key that made it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from llmstack.services.api.responses.store import SQLiteStore, Stored
from tests.support.procs import Service, free_port
from tests.support.stack import Stack


def record(i: int, owner: str = "", age: float = 0.0) -> Stored:
    rid = f"resp_{i}"
    return Stored(rid, owner, time.time() - age, {"id": rid, "n": i}, [{"role": "user", "content": str(i)}])


def test_sqlite_store_reads_its_own_writes_and_keeps_them(tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLiteStore(tmp_path / "responses.sqlite3")
        await store.save(record(1, "alice"))
        got = await store.load("resp_1", "alice")  # queued or written: found either way
        assert got is not None and got.response == {"id": "resp_1", "n": 1}
        assert await store.load("resp_1", "bob") is None  # someone else's
        assert await store.load("resp_2", "alice") is None
        assert not await store.delete("resp_1", "bob")
        await store.close()
        reopened = SQLiteStore(tmp_path / "responses.sqlite3")
        again = await reopened.load("resp_1", "alice")
        assert again is not None and again.conversation == [{"role": "user", "content": "1"}]
        assert await reopened.delete("resp_1", "alice")
        assert await reopened.load("resp_1", "alice") is None  # gone at once, before the write is committed
        await reopened.close()

    asyncio.run(run())
    mode = sqlite3.connect(tmp_path / "responses.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_sqlite_store_retention(tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLiteStore(tmp_path / "r.sqlite3", max_responses=3, max_age=3600)
        for i in range(5):
            await store.save(record(i, age=10 - i))
        await store.save(record(9, age=7200))  # older than max_age: never answered
        assert await store.load("resp_9", "") is None
        await store.close()
        store = SQLiteStore(tmp_path / "r.sqlite3", max_responses=3, max_age=3600)  # retention runs at start
        kept = [i for i in range(5) if await store.load(f"resp_{i}", "") is not None]
        await store.close()
        assert kept == [2, 3, 4]  # the newest three
        rows = sqlite3.connect(tmp_path / "r.sqlite3").execute("SELECT id FROM responses").fetchall()
        assert sorted(r[0] for r in rows) == ["resp_2", "resp_3", "resp_4"]

    asyncio.run(run())


@pytest.fixture(scope="module")
def stored_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Service], Path, str]]:
    """An API server of its own with a state directory and two keys, on the shared stack's workers."""
    state = tmp_path_factory.mktemp("api-state")
    port = free_port()
    args = ["api", "--port", str(port), "--controller-address", stack.controller_url, "--sync-interval", "0.2"]
    services: list[Service] = []

    def start() -> Service:
        svc = Service(
            f"api-stored-{len(services)}",
            [*args, "--state-dir", str(state)],
            tmp_path_factory.mktemp("api-stored-logs"),
            env={"LLMSTACK_API_KEYS": "sk-alpha,sk-beta"},
        ).start()
        services.append(svc)
        svc.wait_healthy(f"http://127.0.0.1:{port}/health")
        return svc

    start()
    try:
        yield services, state, f"http://127.0.0.1:{port}"
    finally:
        for svc in services:
            svc.stop()


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, _strict_response_validation=True, max_retries=0)


def test_stored_responses_survive_a_restart(stored_api, stack: Stack, tmp_path_factory) -> None:  # noqa: ANN001
    services, state, url = stored_api
    alpha = client(url, "sk-alpha")
    first = alpha.responses.create(model="tiny", input="Tell me about Beijing.", max_output_tokens=4)
    services[-1].stop()
    assert (state / "responses.sqlite3").is_file()
    restarted = Service(
        "api-stored-restarted", services[-1].args, tmp_path_factory.mktemp("restarted"),
        env={"LLMSTACK_API_KEYS": "sk-alpha,sk-beta"},
    ).start()  # fmt: skip
    services.append(restarted)
    restarted.wait_healthy(f"{url}/health")
    stack.wait_models("tiny")
    got = alpha.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    second = alpha.responses.create(
        model="tiny", previous_response_id=first.id, input="And Shanghai?", max_output_tokens=1
    )
    assert second.usage.input_tokens > first.usage.input_tokens  # the stored conversation came first
    deleted = httpx.delete(f"{url}/v1/responses/{first.id}", headers={"Authorization": "Bearer sk-alpha"})
    assert deleted.json() == {"id": first.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        alpha.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        alpha.responses.create(model="tiny", previous_response_id=first.id, input="x", max_output_tokens=1)


def test_stored_responses_belong_to_their_key(stored_api) -> None:  # noqa: ANN001
    _, _, url = stored_api
    mine = client(url, "sk-alpha").responses.create(model="tiny", input="hi", max_output_tokens=2)
    beta = client(url, "sk-beta")
    with pytest.raises(openai.NotFoundError):
        beta.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        beta.responses.create(model="tiny", previous_response_id=mine.id, input="x", max_output_tokens=1)
    assert httpx.delete(f"{url}/v1/responses/{mine.id}", headers={"x-api-key": "sk-beta"}).status_code == 404
    assert client(url, "sk-alpha").responses.retrieve(mine.id).id == mine.id  # still there for its owner


def test_anthropic_clients_use_the_same_keys(stored_api) -> None:  # noqa: ANN001
    _, _, url = stored_api
    ok = anthropic.Anthropic(base_url=url, api_key="sk-beta", max_retries=0, _strict_response_validation=True)
    reply = ok.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.output_tokens >= 1
    wrong = anthropic.Anthropic(base_url=url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["error"]["type"] == "authentication_error" and "sk-" not in str(err.value.body)
    missing = httpx.post(f"{url}/v1/messages", json={"model": "tiny", "max_tokens": 1, "messages": []})
    assert missing.status_code == 401 and missing.json()["type"] == "error"
