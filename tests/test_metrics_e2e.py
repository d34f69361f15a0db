"""Prometheus metrics on the API server, worker and controller count exactly what was sent, across a
worker restart; a request id follows a failing request into both logs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import Stack, new_stack

MESSAGES = [{"role": "user", "content": "Count to three."}]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    s = new_stack(tmp_path_factory.mktemp("metrics-logs"))
    try:
        s.start_controller()
        s.start_worker("worker", tiny_model_dir, "--model-names", "tiny")
        s.start_api()
        s.wait_models("tiny")
        yield s
    finally:
        s.group.stop_all()


def _traffic(stack: Stack) -> dict[str, int]:
    """3 chat, 2 streamed chat, 1 completion (4 tokens each), and 3 errors; returns token totals (and
    the chat prompt's length: the same chat, so all but the first are prefix-cache hits)."""
    client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0)
    prompt_tokens = 0
    for _ in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4, extra_body={"ignore_eos": True}
        )
        prompt_tokens += r.usage.prompt_tokens
    chat_prompt = r.usage.prompt_tokens
    for _ in range(2):
        stream = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        prompt_tokens += [c for c in stream if c.usage][-1].usage.prompt_tokens
    r = client.completions.create(model="tiny", prompt="one two", max_tokens=4, extra_body={"ignore_eos": True})
    prompt_tokens += r.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ghost", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=9)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 3000}])
    return {"prompt": prompt_tokens, "completion": 6 * 4, "chat_prompt": chat_prompt}


def _check(api_before, api_after, worker_before, worker_after, tokens: dict[str, int]) -> None:
    chat, comp = "/v1/chat/completions", "/v1/completions"
    d = lambda name, **kw: delta(api_after, api_before, name, **kw)  # noqa: E731
    assert d("llmstack_api_requests_total", model="tiny", endpoint=chat, status="200") == 5
    assert d("llmstack_api_requests_total", model="tiny", endpoint=comp, status="200") == 1
    assert d("llmstack_api_requests_total", model="unknown", endpoint=chat, status="404") == 1
    assert d("llmstack_api_requests_total", model="unknown", endpoint=chat, status="400") == 1  # invalid body
    assert d("llmstack_api_requests_total", model="tiny", endpoint=chat, status="400") == 1  # context too long
    assert d("llmstack_api_time_to_first_token_seconds_count", model="tiny") == 6
    assert d("llmstack_api_time_per_output_token_seconds_count", model="tiny") == 6
    assert d("llmstack_api_request_duration_seconds_count", model="tiny", endpoint=chat) == 6
    assert d("llmstack_api_generation_tokens_total", model="tiny") == tokens["completion"]
    assert d("llmstack_api_prompt_tokens_total", model="tiny") == tokens["prompt"]
    assert value(api_after, "llmstack_api_requests_running", model="tiny") == 0
    w = lambda name, **kw: delta(worker_after, worker_before, name, **kw)  # noqa: E731
    assert w("llmstack_worker_requests_total", model="tiny", endpoint="/generate", status="200") == 6
    assert w("llmstack_worker_requests_total", model="tiny", endpoint="/generate", status="400") == 1
    assert w("llmstack_worker_time_to_first_token_seconds_count", model="tiny") == 6
    assert w("llmstack_worker_generation_tokens_total", model="tiny") == tokens["completion"]
    assert w("llmstack_worker_prompt_tokens_total", model="tiny") == tokens["prompt"]
    assert value(worker_after, "llmstack_worker_requests_queued", model="tiny") == 0
    # every prompt is looked up in the prefix cache; 4 of the 5 chats reuse all but the last token of the first
    assert w("llmstack_worker_prefix_cache_queried_tokens_total", model="tiny") == tokens["prompt"]
    assert w("llmstack_worker_prefix_cache_hit_tokens_total", model="tiny") >= 4 * (tokens["chat_prompt"] - 1)
    assert 0 < value(worker_after, "llmstack_worker_prefix_cache_hit_ratio", model="tiny") < 1


def test_counters_match_traffic_and_survive_a_worker_restart(small_stack: Stack, tiny_model_dir: Path) -> None:
    worker_url = small_stack.workers["worker"][1]
    api_before, worker_before = scrape(small_stack.api_url), scrape(worker_url)
    tokens = _traffic(small_stack)
    api_mid, worker_after = scrape(small_stack.api_url), scrape(worker_url)
    _check(api_before, api_mid, worker_before, worker_after, tokens)
    assert value(api_mid, "llmstack_api_workers", model="tiny") == 1
    controller = scrape(small_stack.controller_url)
    assert value(controller, "llmstack_controller_workers", model="tiny") == 1
    assert value(controller, "llmstack_controller_worker_events_total", event="registered") >= 1

    # the worker dies and a new one takes over; the API server's counters keep counting exactly
    small_stack.workers["worker"][0].kill()
    small_stack.start_worker("worker2", tiny_model_dir, "--model-names", "tiny")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        table = httpx.get(f"{small_stack.controller_url}/workers").json()["workers"]
        if [w["worker_address"] for w in table] == [small_stack.workers["worker2"][1]]:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # one routing sync
    new_worker_before = scrape(small_stack.workers["worker2"][1])
    tokens2 = _traffic(small_stack)
    _check(api_mid, scrape(small_stack.api_url), new_worker_before, scrape(small_stack.workers["worker2"][1]), tokens2)


def test_request_id_reaches_both_logs_and_the_error_body(small_stack: Stack) -> None:
    rid = "req-test-4242"
    resp = httpx.post(
        f"{small_stack.base_url}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]},
        headers={"X-Request-Id": rid},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["request_id"] == rid and resp.headers["x-request-id"] == rid
    time.sleep(0.3)
    api_log = small_stack.group.services[-1].log_text()
    worker_logs = "".join(svc.log_text() for svc, _ in small_stack.workers.values())
    assert any(rid in line and "400" in line for line in api_log.splitlines())
    assert any(rid in line and "/generate" in line for line in worker_logs.splitlines())
    generated = httpx.post(
        f"{small_stack.base_url}/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    )
    assert len(generated.headers["x-request-id"]) >= 16  # generated when the client sends none
