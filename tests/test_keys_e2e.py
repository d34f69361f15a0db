"""Named API keys end to end: real controller, tiny-model workers and API servers on loopback, the official
`openai` client.  A key limited to one model gets 404 for another (the body of an unknown model), unknown
keys 401; rpm and tpm bursts get OpenAI's 429 with Retry-After and succeed after waiting that long; a
concurrency limit holds under 32 parallel streams; priority orders a worker's queue; usage survives a
SIGKILL of the API server; a keys file changed under a running server takes effect within 2 s (and a
broken one keeps the last good keys)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.procs import Service, free_port, run_llmstack
from tests.support.stack import Stack, new_stack

KEYS = {
    "solo": "sk-solo-4f1c2a",
    "rpm": "sk-rpm-7d2b19",
    "tpm": "sk-tpm-0a8e44",
    "conc": "sk-conc-5b7c31",
    "low": "sk-low-93e0f2",
    "high": "sk-high-2c6d58",
    "typo": "sk-typo-61aa07",
}
PLAIN = "sk-plain-e2e-1"
MESSAGES = [{"role": "user", "content": "Hello there"}]

KEYS_TOML = f"""
[[keys]]
name = "solo"
key = "{KEYS["solo"]}"
models = ["tiny"]

[[keys]]
name = "rpm"
key = "{KEYS["rpm"]}"
rpm = 20

[[keys]]
name = "tpm"
key = "{KEYS["tpm"]}"
tpm = 600

[[keys]]
name = "conc"
key = "{KEYS["conc"]}"
max_concurrent = 4

[[keys]]
name = "low"
key = "{KEYS["low"]}"
priority = -5

[[keys]]
name = "high"
key = "{KEYS["high"]}"
priority = 5

[[keys]]
name = "typo"
key = "{KEYS["typo"]}"
models = ["tiny-typo*"]
"""


class KeyedStack:
    def __init__(self, stack: Stack, root: Path) -> None:
        self.stack = stack
        self.root = root

    def start_api(self, name: str, keys_file: Path, state_dir: Path, *extra: str) -> tuple[Service, str]:
        port = free_port()
        svc = self.stack.group.start(
            name,
            "api",
            "--port", str(port), "--controller-address", self.stack.controller_url, "--sync-interval", "0.2",
            "--keys-file", str(keys_file), "--state-dir", str(state_dir), *extra,
            env={"LLMSTACK_API_KEYS": PLAIN},
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        svc.wait_healthy(f"{url}/health", timeout=60)
        _wait_models(url, "tiny", "tiny-b", "tiny-q")
        return svc, url


def _wait_models(url: str, *names: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(n in httpx.get(f"{url}/health", timeout=5).json()["models"] for n in names):
            return
        time.sleep(0.1)
    raise AssertionError(f"models {names} not routable at {url}")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[KeyedStack]:
    root = tmp_path_factory.mktemp("keys-e2e")
    stack = new_stack(root / "logs")
    try:
        stack.start_controller()
        stack.start_worker("worker-tiny", tiny_model_dir, "--model-names", "tiny,tiny-b", wait=False)
        stack.start_worker(
            "worker-queue", tiny_model_dir, "--model-names", "tiny-q", "--limit-worker-concurrency", "1", wait=False
        )
        for svc, url in stack.workers.values():
            svc.wait_healthy(f"{url}/health", timeout=180)
        yield KeyedStack(stack, root)
    except BaseException:
        print(stack.group.logs(60))
        raise
    finally:
        stack.group.stop_all()


@pytest.fixture(scope="module")
def api(keyed: KeyedStack) -> Iterator[str]:
    keys_file = keyed.root / "keys.toml"
    keys_file.write_text(KEYS_TOML)
    svc, url = keyed.start_api("api", keys_file, keyed.root / "state")
    yield url
    svc.stop()


def client(url: str, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS.get(name, name), max_retries=0)


def _error_without_id(exc: openai.APIStatusError) -> dict[str, Any]:
    body = dict(exc.response.json()["error"])
    body.pop("request_id", None)
    return body


# -- who may use what -------------------------------------------------------------------------------------
def test_a_key_limited_to_one_model_gets_404_for_another(api: str, openapi_validate) -> None:  # noqa: ANN001
    solo = client(api, "solo")
    reply = solo.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as other:
        solo.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=3)
    with pytest.raises(openai.NotFoundError) as unknown:
        client(api, PLAIN).chat.completions.create(model="tiny-bb", messages=MESSAGES, max_tokens=3)
    openapi_validate("ErrorResponse", other.value.response.json())
    assert _error_without_id(other.value) == {
        **_error_without_id(unknown.value),
        "message": "The model 'tiny-b' does not exist.",
    }
    with pytest.raises(openai.NotFoundError):  # streaming and other endpoints alike
        solo.completions.create(model="tiny-b", prompt="Hi", max_tokens=2, stream=True)
    assert [m.id for m in solo.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        solo.models.retrieve("tiny-b")
    assert {"tiny", "tiny-b", "tiny-q"} <= {m.id for m in client(api, PLAIN).models.list()}  # plain keys: all


def test_unknown_or_missing_keys_get_401_and_anthropic_header_works(api: str) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(api, "sk-not-a-key").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert wrong.value.response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{api}/v1/models").json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{api}/v1/models", headers={"x-api-key": KEYS["solo"]}).status_code == 200
    assert httpx.get(f"{api}/v1/models", headers={"x-api-key": "sk-nope"}).status_code == 401


# -- rates -------------------------------------------------------------------------------------------------
def _burst_until_429(c: openai.OpenAI, limit: int, **kwargs: Any) -> tuple[int, openai.RateLimitError, float]:
    started = time.monotonic()
    for ok in range(limit + 50):
        try:
            raw = c.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, **kwargs)
            assert raw.parse().usage is not None
        except openai.RateLimitError as exc:
            return ok, exc, time.monotonic() - started
    raise AssertionError(f"no 429 after {limit + 50} requests")


def _check_429(exc: openai.RateLimitError, kind: str, openapi_validate) -> float:  # noqa: ANN001
    body = exc.response.json()
    openapi_validate("ErrorResponse", body)
    assert body["error"]["type"] == kind and body["error"]["code"] == "rate_limit_exceeded", body
    headers = exc.response.headers
    assert int(headers["retry-after"]) >= 1
    assert int(headers["retry-after-ms"]) <= int(headers["retry-after"]) * 1000
    assert headers[f"x-ratelimit-remaining-{kind}"] == "0" or kind == "tokens"
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-{kind}" in headers
    return int(headers["retry-after-ms"]) / 1000


def test_rpm_burst_gets_429_and_succeeds_after_retry_after(api: str, openapi_validate) -> None:  # noqa: ANN001
    c = client(api, "rpm")
    first = c.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert first.headers["x-ratelimit-limit-requests"] == "20"
    assert first.headers["x-ratelimit-remaining-requests"] == "19"
    ok, refused, elapsed = _burst_until_429(c, 20, max_tokens=1)
    assert 19 <= ok <= 19 + int(elapsed / 3) + 1  # the bucket refills one request every 3 s
    wait = _check_429(refused, "requests", openapi_validate)
    time.sleep(wait)
    assert c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1).usage is not None


def test_tpm_burst_gets_429_and_succeeds_after_retry_after(api: str, openapi_validate) -> None:  # noqa: ANN001
    c = client(api, "tpm")
    with pytest.raises(openai.RateLimitError) as too_large:  # a prompt beyond the whole limit: no waiting helps
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 700}], max_tokens=1)
    assert "Request too large" in too_large.value.response.json()["error"]["message"]
    assert "retry-after" not in too_large.value.response.headers
    started = time.monotonic()
    first = c.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=20)
    refilled = (time.monotonic() - started) * 600 / 60
    usage = first.parse().usage
    assert usage is not None
    assert int(first.headers["x-ratelimit-remaining-tokens"]) <= 600 - usage.total_tokens + refilled  # this one
    ok, refused, _ = _burst_until_429(c, 600 // usage.total_tokens, max_tokens=20)
    assert ok >= 600 // usage.total_tokens - 2
    wait = _check_429(refused, "tokens", openapi_validate)
    time.sleep(wait)
    reply = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20)
    assert reply.usage is not None and reply.usage.completion_tokens >= 1


async def _stream(client: httpx.AsyncClient, url: str, key: str, model: str, tokens: int) -> tuple[int, Any]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": tokens, "stream": True, "ignore_eos": True}
    async with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        if resp.status_code != 200:
            return resp.status_code, (json.loads(await resp.aread()), resp.headers)
        chunks = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        return 200, chunks


def _running(url: str, key: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f'llmstack_api_key_requests_running{{key="{key}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_max_concurrent_holds_under_32_parallel_streams(api: str) -> None:
    peak = {"api": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["api"] = max(peak["api"], _running(api, "conc"))
            time.sleep(0.01)

    async def burst(n: int) -> list[tuple[int, Any]]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(_stream(c, api, KEYS["conc"], "tiny", 300) for _ in range(n)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = asyncio.run(burst(32))
    finally:
        done.set()
        sampler.join()
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert 4 <= len(ok) < 32 and peak["api"] <= 4, (len(ok), peak)
    for status, (body, headers) in refused:
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and int(headers["retry-after"]) >= 1
        assert "concurrent" in body["error"]["message"]
    assert all(chunks[-1] == "data: [DONE]" for _, chunks in ok)
    assert _running(api, "conc") == 0
    again = asyncio.run(burst(4))  # the slots came back
    assert [s for s, _ in again] == [200] * 4


def test_priority_orders_the_workers_queue(api: str) -> None:
    """The tiny-q worker runs one request at a time: while one runs, a low-priority request queues, then a
    high-priority one; the high one is served first."""
    finished: list[str] = []

    async def one(c: httpx.AsyncClient, name: str, delay: float, tokens: int) -> None:
        await asyncio.sleep(delay)
        status, _ = await _stream(c, api, KEYS.get(name, name), "tiny-q", tokens)
        assert status == 200
        finished.append(name)

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(one(c, PLAIN, 0, 500), one(c, "low", 0.2, 5), one(c, "high", 0.4, 5))

    asyncio.run(scenario())
    assert finished == [PLAIN, "high", "low"]


# -- usage ---------------------------------------------------------------------------------------------------
def _usage(state: Path, *args: str) -> dict[str, Any]:
    result = run_llmstack("usage", "--run-dir", str(state), "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_usage_equals_what_clients_saw_after_sigkill(keyed: KeyedStack) -> None:
    keys_file = keyed.root / "kill-keys.toml"
    keys_file.write_text(KEYS_TOML)
    state = keyed.root / "kill-state"
    svc, url = keyed.start_api("api-kill", keys_file, state)
    seen: dict[str, list[int]] = {}

    def saw(name: str, usage: Any) -> None:
        totals = seen.setdefault(name, [0, 0, 0])
        totals[0] += 1
        totals[1] += usage.prompt_tokens
        totals[2] += usage.completion_tokens

    def work(name: str) -> None:
        c = client(url, name)
        for i in range(3):
            saw(name, c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4 + i).usage)
            stream = c.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
            )
            saw(name, [chunk for chunk in stream][-1].usage)
            saw(name, c.completions.create(model="tiny", prompt=["One", "Two three"], max_tokens=3).usage)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("solo", "low", PLAIN)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    svc.kill()  # SIGKILL right after the last response: nothing it acknowledged may be lost
    names = {"solo": "solo", "low": "low", PLAIN: "key-1"}
    rows = _usage(state)["rows"]
    svc2, url2 = keyed.start_api("api-kill-2", keys_file, state)
    try:
        client(url2, "solo").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
        after = _usage(state, "--key", "solo")["rows"]
    finally:
        svc2.stop()
    for who, (requests, prompt, completion) in seen.items():
        mine = [r for r in rows if r["key"] == names[who]]
        assert len(mine) == 1 and mine[0]["model"] == "tiny" and mine[0]["errors"] == 0, rows
        assert (mine[0]["requests"], mine[0]["prompt_tokens"], mine[0]["completion_tokens"]) == (
            requests,
            prompt,
            completion,
        ), (who, rows)
    assert after[0]["requests"] == seen["solo"][0] + 1  # the restarted server adds to the same file


def test_usage_table_and_per_key_metrics(api: str) -> None:
    client(api, "solo").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    metrics = httpx.get(f"{api}/metrics").text
    assert 'llmstack_api_key_requests_total{key="solo"}' in metrics
    assert 'llmstack_api_key_rate_limited_total{key="rpm",limit="rpm"}' in metrics
    assert not any(secret in metrics for secret in KEYS.values())


# -- keys that change under a running server ------------------------------------------------------------------
def _refused_within(url: str, key: str, status: int, timeout: float = 2.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout + 1:
        if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"key did not answer {status} within {timeout + 1}s")


def test_keys_file_changes_apply_within_2s_and_bad_files_keep_the_last_good(keyed: KeyedStack) -> None:
    keys_file = keyed.root / "live-keys.toml"
    keys_file.write_text('[[keys]]\nname = "ann"\nkey = "sk-ann-111"\n\n[[keys]]\nname = "ben"\nkey = "sk-ben-222"\n')
    svc, url = keyed.start_api("api-live", keys_file, keyed.root / "live-state")
    assert _refused_within(url, "sk-ben-222", 200) < 0.5
    keys_file.write_text('[[keys]]\nname = "ann"\nkey = "sk-ann-111"\n\n[[keys]]\nname = "cat"\nkey = "sk-cat-333"\n')
    assert _refused_within(url, "sk-ben-222", 401) <= 2.0  # removed
    assert _refused_within(url, "sk-cat-333", 200) <= 2.0  # added
    for broken, why in (
        ('[[keys]]\nname = "ann"\nkey = "sk-ann-111"\n[[keys\n', "not valid TOML"),
        ('[[keys]]\nname = "ann"\nkey = "sk-ann-111"\nrpm = -5\n', "rpm: Input should be greater than or equal to 1"),
    ):
        keys_file.write_text(broken)
        deadline = time.monotonic() + 2
        while why not in svc.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert why in svc.log_text() and "keeping the 3 keys in force" in svc.log_text()  # ann, cat, the plain key
        for key in ("sk-ann-111", "sk-cat-333"):
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # SIGHUP: a change the polling cannot see (same size, inode and modification time) is read at once
    reloads = svc.log_text().count("keys reloaded")
    keys_file.write_text('[[keys]]\nname = "ann"\nkey = "sk-ann-111"\n\n[[keys]]\nname = "cat"\nkey = "sk-cat-333"\n')
    deadline = time.monotonic() + 2
    while svc.log_text().count("keys reloaded") == reloads and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)  # one more poll: the server has seen the file as it is now
    stamp = keys_file.stat()
    with keys_file.open("r+") as fh:
        fh.write(keys_file.read_text().replace("cat", "dan").replace("sk-dan-333", "sk-dan-444"))
    os.utime(keys_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    time.sleep(1.0)
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-dan-444"}).status_code == 401
    svc.signal(signal.SIGHUP, group=False)
    assert _refused_within(url, "sk-dan-444", 200, timeout=1.0) <= 1.0
    logs = svc.log_text()
    svc.stop()
    assert not any(secret in logs for secret in ("sk-ann-111", "sk-ben-222", "sk-cat-333", "sk-dan-444"))


def test_bad_keys_at_start_and_unknown_models(keyed: KeyedStack, api: str) -> None:
    bad = keyed.root / "bad-keys.json"
    bad.write_text(json.dumps({"keys": [{"name": "eve", "key": "sk-eve-secret", "tpm": -1}]}))
    port = str(free_port())
    result = run_llmstack("api", "--port", port, "--keys-file", str(bad), timeout=60)
    assert result.returncode != 0
    assert "keys[0].tpm: Input should be greater than or equal to 1" in result.stderr
    assert "sk-eve-secret" not in result.stderr + result.stdout
    # a pattern that matches no served model: the server warns (by key name) and the key gets 404
    log = (keyed.stack.group.log_dir / "api.log").read_text()
    assert "key 'typo': model pattern 'tiny-typo*' matches none of the served models" in log
    with pytest.raises(openai.NotFoundError):
        client(api, "typo").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert not any(secret in log for secret in KEYS.values())


# -- through `llmstack up` --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stack_with_named_keys_and_a_keys_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    ports = {name: free_port() for name in ("controller", "worker", "api")}
    colleague = "sk-colleague-8e21"
    keys_file = tmp_path / "team-keys.toml"
    keys_file.write_text('[[keys]]\nname = "ann"\nkey = "sk-ann-from-file"\n')
    config = tmp_path / "stack.toml"
    config.write_text(
        f"""
[stack]
name = "keys-e2e"
run_dir = "run"
drain_timeout = 2
start_timeout = 180

[controller]
port = {ports["controller"]}
heartbeat_expiry = 3

[[models]]
model = "{tiny_model_dir}"
source = "local"
names = ["tiny", "tiny-b"]
device = "cpu"
port = {ports["worker"]}
heartbeat_interval = 0.5

[api]
port = {ports["api"]}
sync_interval = 0.2
keys_file = "team-keys.toml"

[[api.keys]]
name = "colleague"
key = "{colleague}"
models = ["tiny"]
rpm = 100

[webui]
enabled = false
"""
    )
    check = run_llmstack("config", "check", "--json", "-c", str(config))
    assert check.returncode == 0, check.stderr
    assert colleague not in check.stdout and "sk-ann-from-file" not in check.stdout
    assert json.loads(check.stdout)["warnings"] == []
    up = run_llmstack("up", "--detach", "-c", str(config), timeout=300)
    url = f"http://127.0.0.1:{ports['api']}"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Authorization: Bearer $LLMSTACK_API_KEY" in up.stdout  # the hint knows keys are required
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=colleague, max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).usage is not None
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=2)
        assert _refused_within(url, "sk-ann-from-file", 200) < 0.5
        keys_file.write_text('[[keys]]\nname = "bea"\nkey = "sk-bea-from-file"\n')  # while the stack runs
        assert _refused_within(url, "sk-ann-from-file", 401) <= 2.0
        assert _refused_within(url, "sk-bea-from-file", 200) <= 2.0
        usage = run_llmstack("usage", "-c", str(config), "--json", "--key", "colleague")
        assert usage.returncode == 0, usage.stderr
        rows = json.loads(usage.stdout)["rows"]
        assert [(r["model"], r["requests"], r["errors"]) for r in rows] == [("tiny", 1, 0), ("tiny-b", 1, 1)]
        table = run_llmstack("usage", "-c", str(config))
        assert table.returncode == 0 and "colleague" in table.stdout and "completion tokens" in table.stdout
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            assert colleague not in " ".join(proc.info["cmdline"] or [])
    finally:
        down = run_llmstack("down", "-c", str(config), "--timeout", "2", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert colleague not in logs and "sk-ann-from-file" not in logs and "key=colleague" in logs
