"""Two workers for one model behind one API server: both take traffic under each dispatch method; a
worker that stops heartbeating leaves the routing table; the controller can restart without a hitch."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.stack import Stack, new_stack


def _served(stack: Stack) -> dict[str, int]:
    return {name: stack.worker_health(name)["served"] for name in ("worker-a", "worker-b")}


def _burst(client: openai.OpenAI, count: int) -> None:
    def one(i: int) -> str:
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=8, temperature=0
        )
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        assert all(reason in ("stop", "length") for reason in pool.map(one, range(count)))


def _routed_workers(stack: Stack) -> int:
    return len(httpx.get(f"{stack.controller_url}/workers").json()["workers"])


@pytest.mark.slow
def test_two_workers_dispatch_expiry_and_controller_restart(tmp_path: Path, tiny_model_dir: Path) -> None:
    stack = new_stack(tmp_path / "logs")
    try:
        stack.start_controller("--dispatch-method", "lottery")
        stack.start_worker("worker-a", tiny_model_dir, "--model-names", "tiny", wait=False)
        stack.start_worker("worker-b", tiny_model_dir, "--model-names", "tiny", wait=False)
        for svc, url in stack.workers.values():
            svc.wait_healthy(f"{url}/health", timeout=180)
        stack.start_api()
        stack.wait_models("tiny")
        deadline = time.monotonic() + 20
        while _routed_workers(stack) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0)

        # lottery: both workers take traffic
        before = _served(stack)
        _burst(client, 24)
        after = _served(stack)
        assert all(after[w] > before[w] for w in after), (before, after)

        # the controller restarts with the other method; serving never stops, workers re-register
        controller = stack.group.services[0]
        controller.stop()
        _burst(client, 4)  # the API server keeps its last routing table
        stack.group.services.remove(controller)
        stack.start_controller("--dispatch-method", "shortest_queue")
        deadline = time.monotonic() + 20
        while _routed_workers(stack) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _routed_workers(stack) == 2
        time.sleep(0.5)  # one routing sync
        before = _served(stack)
        _burst(client, 24)
        after = _served(stack)
        assert all(after[w] > before[w] for w in after), (before, after)

        # worker-b stops heartbeating (SIGSTOP): it leaves the controller's table and the API's routing
        worker_b = stack.workers["worker-b"][0]
        worker_b.signal(signal.SIGSTOP, group=False)
        try:
            deadline = time.monotonic() + 10
            while _routed_workers(stack) > 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _routed_workers(stack) == 1
            time.sleep(0.5)
            served_a = stack.worker_health("worker-a")["served"]
            started = time.monotonic()
            _burst(client, 12)  # none may hang on the frozen worker
            assert time.monotonic() - started < 30
            assert stack.worker_health("worker-a")["served"] == served_a + 12
        finally:
            worker_b.signal(signal.SIGCONT, group=False)
        # once it runs again it finds itself forgotten, registers again and takes traffic
        deadline = time.monotonic() + 15
        while _routed_workers(stack) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _routed_workers(stack) == 2
        assert "registering again" in worker_b.log_text() or "registered with controller" in worker_b.log_text()
    except BaseException:
        print(stack.group.logs(40))
        raise
    finally:
        stack.group.stop_all()
