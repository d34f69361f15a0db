"""Faults under load, end to end with real processes.

With `llmstack up` (two workers of one model, 32 concurrent streaming clients): a worker killed mid-load
costs no hung client, only streams already under way end (with an error event, within 2 s), requests
started after the kill all succeed and the supervisor brings the worker back into service; a controller
killed under load costs no request at all.  With hand-started services: a frozen worker (SIGSTOP) ends
its stream with an error event within the stream timeout, overload is a 429 with Retry-After, the
request timeout holds, and SIGTERM drains a worker (after it left routing) and an API server.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.fault_injection import (
    Outcome,
    UpStack,
    controller_restart_scenario,
    kill_worker_scenario,
    running_stack,
    stream_chat,
)
from tests.support.procs import Service
from tests.support.stack import Stack, new_stack

STREAM_TIMEOUT = 2.0
LONG = 1500  # tokens: a stream that lasts several seconds on the tiny model


@pytest.fixture(scope="module")
def up_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[UpStack]:
    root = tmp_path_factory.mktemp("faults-up")
    stack: UpStack | None = None
    try:
        with running_stack(root, tiny_model_dir) as stack:
            yield stack
    except BaseException:
        if stack is not None:
            print(stack.logs(60))
        raise


def _print(name: str, report: dict[str, Any]) -> None:
    print(f"\n{name}: " + json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2))


@pytest.mark.slow
def test_controller_killed_under_load_fails_nothing(up_stack: UpStack) -> None:
    report = controller_restart_scenario(up_stack, clients=32)
    _print("controller restart", report)
    requests = report["requests"]
    assert requests["sent"] > 64, report
    assert requests["completed"] == requests["sent"], report
    assert report["routable_after"] == 2


@pytest.mark.slow
def test_worker_killed_under_load(up_stack: UpStack) -> None:
    report = kill_worker_scenario(up_stack, clients=32, max_tokens=256)  # long enough to be mid-stream
    _print("worker kill", report)
    killed = report["_killed_at"]
    before, after = report["before_kill"], report["after_kill"]
    assert report["streaming_at_kill"] > 0, "the kill must land mid-stream"
    # nothing hangs or breaks off silently: each stream completes or ends with an error event
    odd = [o for o in report["_outcomes"]["before"] if o["status"] in ("hung", "broken")]
    assert before["hung"] == before["broken"] == 0, odd
    assert before["completed"] + before["errored"] == before["sent"] == 32
    for o in report["_outcomes"]["before"]:
        if o["status"] != "completed":
            assert o["status"] == "error_event" and o["ended"] - killed <= 2.0, o
    # every request started after the kill succeeds (failover before the first token)
    assert after["completed"] == after["sent"] == 32, report
    assert report["left_routing_after_s"] <= 2.0
    assert report["recovery_requests"]["completed"] == report["recovery_requests"]["sent"]
    assert up_stack.routable() == 2


# -- hand-started services ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    s = new_stack(tmp_path_factory.mktemp("faults-logs"))
    try:
        s.start_controller("--heartbeat-expiry", "2")
        common = ["--model-names", "tiny", "--drain-timeout", "20"]
        s.start_worker("worker-a", tiny_model_dir, *common, wait=False)
        s.start_worker("worker-b", tiny_model_dir, *common, wait=False)
        narrow = ["--model-names", "tiny-narrow", "--limit-worker-concurrency", "1", "--max-queue", "0"]
        s.start_worker("worker-narrow", tiny_model_dir, *narrow, wait=False)
        for svc, url in s.workers.values():
            svc.wait_healthy(f"{url}/health", timeout=180)
        s.start_api("--stream-timeout", str(STREAM_TIMEOUT), "--drain-timeout", "20")
        s.wait_models("tiny", "tiny-narrow")
        wait(lambda: _routable(s) == 2, 20, "both tiny workers routable")
        yield s
    except BaseException:
        print(s.group.logs(60))
        raise
    finally:
        s.group.stop_all()


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _routable(s: Stack, model: str = "tiny") -> int:
    return int(httpx.get(f"{s.api_url}/health", timeout=5).json()["workers"].get(model, 0))


def _body(model: str = "tiny", max_tokens: int = LONG, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Go on."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


class Background:
    """One streaming request in a thread, recording what the client sees."""

    def __init__(self, url: str, model: str = "tiny", max_tokens: int = LONG) -> None:
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.outcome = Outcome(started=time.monotonic())
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client() as client:
            stream_chat(client, self.url, self.outcome, self.max_tokens, self.model)

    def wait_first_token(self, timeout: float = 60) -> None:
        wait(lambda: self.outcome.first_token is not None or self.outcome.ended is not None, timeout, "a token")
        assert self.outcome.first_token is not None, self.outcome

    def join(self, timeout: float) -> Outcome:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the client hung: {self.outcome}"
        return self.outcome


def _busy_worker(s: Stack, names: tuple[str, ...] = ("worker-a", "worker-b")) -> str:
    busy: list[str] = []

    def find() -> bool:
        busy[:] = [n for n in names if s.worker_health(n)["running"] > 0]
        return len(busy) == 1

    wait(find, 10, "the worker running the stream")
    return busy[0]


@pytest.mark.slow
def test_frozen_worker_mid_stream_ends_with_an_error_event(stack: Stack) -> None:
    stream = Background(stack.api_url)
    stream.wait_first_token()
    name = _busy_worker(stack)
    worker = stack.workers[name][0]
    worker.signal(signal.SIGSTOP, group=False)
    frozen = time.monotonic()
    try:
        outcome = stream.join(STREAM_TIMEOUT + 10)
        waited = (outcome.ended or 0) - frozen
        assert outcome.status == "error_event", outcome
        assert "stopped answering" in outcome.detail
        assert waited <= STREAM_TIMEOUT + 1.5, waited
        # the frozen worker is out of rotation at once: new requests go to the other one
        assert _routable(stack) == 1
        with httpx.Client(timeout=30) as client:
            for _ in range(4):
                resp = client.post(f"{stack.base_url}/chat/completions", json=_body(max_tokens=4, stream=False))
                assert resp.status_code == 200, resp.text
    finally:
        worker.signal(signal.SIGCONT, group=False)
    wait(lambda: _routable(stack) == 2, 20, "the thawed worker back in rotation")


@pytest.mark.slow
def test_overload_is_429_with_retry_after(stack: Stack, openapi_validate) -> None:
    hog = Background(stack.api_url, model="tiny-narrow")
    hog.wait_first_token()
    with httpx.Client(timeout=30) as client:
        for stream in (False, True):
            resp = client.post(f"{stack.base_url}/chat/completions", json=_body("tiny-narrow", 4, stream))
            assert resp.status_code == 429, resp.text
            assert int(resp.headers["retry-after"]) >= 1
            openapi_validate("ErrorResponse", resp.json())
            assert resp.json()["error"]["code"] == "overloaded"
    assert hog.join(120).status == "completed"
    resp = httpx.post(f"{stack.base_url}/chat/completions", json=_body("tiny-narrow", 4, False), timeout=30)
    assert resp.status_code == 200


@pytest.mark.slow
def test_request_timeout_is_enforced(stack: Stack, openapi_validate, tmp_path: Path) -> None:
    from tests.support.procs import free_port

    port = free_port()
    args = ["api", "--port", str(port), "--controller-address", stack.controller_url, "--request-timeout", "1"]
    with Service("api-1s", args, tmp_path) as api:
        api.wait_healthy(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}"
        wait(lambda: "tiny" in httpx.get(f"{url}/health").json()["models"], 20, "routing")
        t0 = time.monotonic()
        resp = httpx.post(f"{url}/v1/chat/completions", json=_body(stream=False), timeout=30)
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "timeout", resp.text
        openapi_validate("ErrorResponse", resp.json())
        outcome = Background(url).join(30)
        assert outcome.status == "error_event" and "request timeout" in outcome.detail, outcome
        assert time.monotonic() - t0 < 10


def _registered(s: Stack) -> set[str]:
    return {w["worker_address"] for w in httpx.get(f"{s.controller_url}/workers", timeout=5).json()["workers"]}


@pytest.mark.slow
def test_sigterm_worker_leaves_routing_then_finishes_its_streams(stack: Stack) -> None:
    stream = Background(stack.api_url)
    stream.wait_first_token()
    name = _busy_worker(stack)
    worker, url = stack.workers[name]
    other = next(n for n in ("worker-a", "worker-b") if n != name)
    served_other = stack.worker_health(other)["served"]
    worker.signal(signal.SIGTERM, group=False)
    stopped = time.monotonic()
    wait(lambda: url not in _registered(stack), 2, "the worker to unregister")
    assert worker.alive() and stream.outcome.ended is None, "it unregisters before it drains"
    # new requests go elsewhere meanwhile
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            resp = client.post(f"{stack.base_url}/chat/completions", json=_body(max_tokens=4, stream=False))
            assert resp.status_code == 200, resp.text
    assert stack.worker_health(other)["served"] >= served_other + 3
    outcome = stream.join(60)
    assert outcome.status == "completed" and outcome.tokens > 100, outcome
    assert worker.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    assert outcome.ended is not None and outcome.ended - stopped < 20
    assert "unregistering, then finishing 1 request" in worker.log_text()


@pytest.mark.slow
def test_sigterm_api_server_finishes_streams_and_refuses_new_ones(stack: Stack) -> None:
    stream = Background(stack.api_url)
    stream.wait_first_token()
    api = next(s for s in stack.group.services if s.name == "api")
    api.signal(signal.SIGTERM, group=False)

    def refused() -> bool:
        try:
            httpx.get(f"{stack.api_url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        return False

    wait(refused, 5, "the API server to stop accepting")
    outcome = stream.join(60)
    assert outcome.status == "completed" and outcome.tokens > 100, outcome
    assert api.wait(20) in (0, -signal.SIGTERM)
