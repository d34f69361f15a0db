"""Models at run time, end to end: `llmstack up` with on-demand, manual and budgeted models (tiny models
built at test time), real processes on loopback, the official openai client, `llmstack models`.

One stack per scenario, shared by its tests (in order): on demand (first requests wait, one worker for
eight of them, keep-alive, manual loads, a failing load, bad input), and a memory budget that fits two of
the models (LRU evictions, never a busy or pinned one) plus one smaller than any model."""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.procs import free_port
from tests.support.procs import run_llmstack as llmstack
from tests.support.runtime_stack import API_KEY, RuntimeStack

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Hello there"}]


def _entry(name: str, path: Path, extra: str = "") -> str:
    """One `[[models]]` entry on a free port (the stacks of this module run side by side)."""
    return f"""
[[models]]
model = "{path}"
source = "local"
names = ["{name}"]
device = "cpu"
port = {free_port()}
heartbeat_interval = 0.5
{extra}
"""


def _stream(s: RuntimeStack, model: str, max_tokens: int = 8, **extra: object) -> tuple[float, str, int]:
    """(seconds to the first token, finish reason, completion tokens) of one streamed chat."""
    t0 = time.monotonic()
    first = None
    finish, tokens = "", 0
    stream = s.client().chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra or None,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.monotonic() - t0
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.monotonic() - t0), finish, tokens


# -- on demand ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lazy(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[RuntimeStack]:
    root = tmp_path_factory.mktemp("models-lazy")
    broken = root / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    models = (
        _entry("lazy", tiny_model_dir, 'load = "on_demand"\nkeep_alive = "4s"')
        + _entry("hand", tiny_model_dir, 'load = "manual"')
        + _entry("broken", broken, 'load = "on_demand"')
    )
    s = RuntimeStack(root, "models-lazy", models, api_extra='load_wait = "90s"')
    try:
        s.up()
        yield s
    except BaseException:
        print(s.logs(60))
        raise
    finally:
        s.down()


def test_lazy_models_are_listed_unloaded_and_the_stack_is_healthy(lazy: RuntimeStack) -> None:
    cards = lazy.v1_models()
    assert {m: cards[m]["status"] for m in ("lazy", "hand", "broken")} == dict.fromkeys(
        ("lazy", "hand", "broken"), "unloaded"
    )
    assert lazy.live_workers() == []
    status = llmstack("status", "--json", "-c", str(lazy.config))
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["healthy"], status.stdout + status.stderr
    workers = {s["name"]: s for s in report["services"] if s["role"] == "workers"}
    assert {w["state"] for w in workers.values()} == {"unloaded"}
    assert {m["name"]: m["state"] for m in report["model_states"]} == dict.fromkeys(
        ("lazy", "hand", "broken"), "unloaded"
    )
    human = llmstack("status", "-c", str(lazy.config))
    assert human.returncode == 0 and "model states" in human.stdout and "on_demand" in human.stdout


def test_eight_first_requests_wait_for_one_worker_then_stream(lazy: RuntimeStack) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _stream(lazy, "lazy"), range(8)))
    ttfts = sorted(r[0] for r in results)
    print(f"\non-demand load: time to first token over 8 concurrent first requests: min {ttfts[0]:.2f}s "
          f"median {statistics.median(ttfts):.2f}s max {ttfts[-1]:.2f}s")  # fmt: skip
    assert all(finish in ("stop", "length") and tokens > 0 for _, finish, tokens in results)
    loads = [e for e in lazy.events() if e["model"] == "lazy" and e["action"] in ("load", "loaded")]
    assert [e["action"] for e in loads] == ["load", "loaded"], loads  # one worker started for all eight
    log = (lazy.run_dir / "logs" / "worker-lazy.log").read_text()
    assert log.count("supervisor: starting worker-lazy") == 1
    assert lazy.v1_models()["lazy"]["status"] == "loaded"
    row = lazy.rows()["lazy"]
    assert row["memory_source"] == "measured" and row["rss_bytes"] > 50 * 2**20
    assert row["estimate_bytes"] > 400 * 2**20 and row["last_used"] is not None


def test_keep_alive_unloads_the_idle_model_and_the_next_request_loads_it_again(lazy: RuntimeStack) -> None:
    lazy.wait_for(lambda: lazy.rows()["lazy"]["state"] == "unloaded", 30, "lazy unloaded after keep_alive")
    unloads = [e for e in lazy.events("unload") if e["model"] == "lazy"]
    assert unloads and "keep_alive 4s" in unloads[-1]["reason"]
    assert lazy.live_workers() == []
    ttft, finish, _ = _stream(lazy, "lazy")
    print(f"\non-demand reload after keep-alive: time to first token {ttft:.2f}s")
    assert finish in ("stop", "length")
    assert [e["action"] for e in lazy.events() if e["model"] == "lazy"].count("loaded") == 2


def test_a_manual_model_loads_on_command_only(lazy: RuntimeStack) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        lazy.client().chat.completions.create(model="hand", messages=MESSAGES, max_tokens=4)
    assert info.value.status_code == 503
    error = info.value.body
    assert isinstance(error, dict) and error.get("code") == "model_not_loaded"
    assert "llmstack models load hand" in error["message"]
    done = llmstack("models", "load", "hand", "-c", str(lazy.config))
    assert done.returncode == 0 and "hand loaded" in done.stdout, done.stdout + done.stderr
    assert lazy.client().chat.completions.create(model="hand", messages=MESSAGES, max_tokens=4).choices
    listed = llmstack("models", "--json", "-c", str(lazy.config))
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["hand"]["state"] == "loaded" and rows["hand"]["memory_bytes"] > 0
    human = llmstack("models", "-c", str(lazy.config))
    assert human.returncode == 0 and "hand" in human.stdout and "loaded" in human.stdout and "last use" in human.stdout
    done = llmstack("models", "unload", "hand", "-c", str(lazy.config))
    assert done.returncode == 0 and "unloaded" in done.stdout, done.stdout + done.stderr
    assert lazy.rows()["hand"]["state"] == "unloaded"


def test_a_load_that_fails_answers_503_with_the_cause(lazy: RuntimeStack) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        lazy.client().chat.completions.create(model="broken", messages=MESSAGES, max_tokens=4)
    assert info.value.status_code == 503
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "model_load_failed", error
    assert "failed to load: worker worker-broken exited with exit code" in error["message"]
    assert "its log ends:" in error["message"]
    assert lazy.v1_models()["broken"]["status"] == "failed"


def test_bad_input_to_models_and_the_admin_api(lazy: RuntimeStack) -> None:
    done = llmstack("models", "load", "nope", "-c", str(lazy.config))
    assert done.returncode == 2
    assert "'nope' is not in this stack (models: broken, hand, lazy)" in done.stderr
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Bearer {API_KEY}"}):
        resp = httpx.post(f"{lazy.admin_url}/models/lazy/load", headers=headers, timeout=10)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{lazy.admin_url}/models", timeout=10).status_code == 401
    token = (lazy.run_dir / "cluster_token").read_text().strip()
    assert lazy.admin("GET", "/models", key=token).status_code == 200  # the API server's credential: list
    assert lazy.admin("POST", "/models/lazy/unload", key=token).status_code == 403  # ... but not control
    assert oct((lazy.run_dir / "admin_key").stat().st_mode & 0o777) == "0o600"
    assert lazy.admin_url.startswith("http://127.0.0.1:")


# -- a memory budget ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def budget(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[RuntimeStack]:
    root = tmp_path_factory.mktemp("models-budget")
    models = "".join(
        _entry(name, tiny_model_dir, f'load = "on_demand"\nmemory = "400MiB"{extra}')
        for name, extra in (("a", ""), ("b", ""), ("c", ""), ("p", "\npin = true"))
    )
    s = RuntimeStack(root, "models-budget", models, stack_extra='memory_budget = "1000MiB"')
    try:
        s.up()
        yield s
    except BaseException:
        print(s.logs(60))
        raise
    finally:
        s.down()


class Sampler:
    """The largest number of live worker processes seen, sampled from the run state in the background."""

    def __init__(self, s: RuntimeStack) -> None:
        self.s = s
        self.most = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.most = max(self.most, len(self.s.live_workers()))
            time.sleep(0.1)


def test_a_budget_for_two_keeps_two_and_evicts_the_least_recently_used(budget: RuntimeStack) -> None:
    sampler = Sampler(budget)
    try:
        for model in ("a", "b", "c", "a"):
            _, finish, _ = _stream(budget, model)
            assert finish in ("stop", "length")
        evicted = [e["model"] for e in budget.events("evict")]
        print(f"\neviction sequence using a, b, c, a in turn: {evicted}")
        assert evicted == ["a", "b"]
        loaded = {n for n, r in budget.rows().items() if r["state"] == "loaded"}
        assert loaded == {"c", "a"}

        # c is now the least recently used; with a long request in flight on it, b's load must evict a
        long = ThreadPoolExecutor(1).submit(_stream, budget, "c", 1500, ignore_eos=True)
        budget.wait_for(lambda: budget.rows()["c"]["inflight"] > 0, 30, "c's request in flight")
        _, finish, _ = _stream(budget, "b")
        assert finish in ("stop", "length")
        evictions = budget.events("evict")
        print(f"eviction while c had a request in flight: {evictions[-1]['model']} ({evictions[-1]['reason']})")
        assert evictions[-1]["model"] == "a"
        assert "c" in evictions[-1]["reason"] and "in flight" in evictions[-1]["reason"]
        _, finish, tokens = long.result(timeout=120)
        assert finish == "length" and tokens == 1500  # the busy model's stream was never cut

        # p is pinned: it loads (evicting the least recently used of b and c) and, once the least recently
        # used itself, stays while the other one goes
        _stream(budget, "p")
        _stream(budget, "a")
        evicted = [e["model"] for e in budget.events("evict")]
        print(f"eviction sequence in all: {evicted}")
        assert "p" not in evicted and budget.rows()["p"]["state"] == "loaded"
        assert sampler.most <= 2, sampler.most
    finally:
        sampler.stop.set()


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[RuntimeStack]:
    root = tmp_path_factory.mktemp("models-tight")
    s = RuntimeStack(root, "models-tight", _entry("small", tiny_model_dir, 'load = "on_demand"'),
                     stack_extra='memory_budget = "64MiB"')  # fmt: skip
    try:
        s.up()
        yield s
    finally:
        s.down()


def test_a_budget_smaller_than_any_model_refuses_it_with_the_figures(tight: RuntimeStack) -> None:
    done = llmstack("models", "load", "small", "-c", str(tight.config))
    assert done.returncode == 1
    assert "cannot fit even alone: it needs" in done.stderr and "memory_budget is 64 MiB" in done.stderr
    with pytest.raises(openai.APIStatusError) as info:
        tight.client().chat.completions.create(model="small", messages=MESSAGES, max_tokens=4)
    assert info.value.status_code == 503
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "insufficient_memory"
    assert "cannot fit even alone" in info.value.body["message"]
    assert tight.live_workers() == []
