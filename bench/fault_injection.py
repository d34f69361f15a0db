"""Fault injection against a real stack started with `llmstack up`: two workers of one model behind one API
server, many concurrent streaming clients.

1. SIGKILL one worker mid-load: every stream under way must complete or end with an error event within
   2 s; every request started after the kill must succeed; the supervisor restarts the worker and it takes
   traffic again.
2. SIGKILL the controller under load (the supervisor restarts it): no request may fail.

Prints the counts clients saw (sent, completed, errored, hung) and the recovery times.

    python bench/fault_injection.py [--clients 32] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmstack.stack.rundir import RunDir, RunState, ServiceRecord, ServiceState  # noqa: E402
from tests.support.procs import free_port  # noqa: E402
from tests.support.procs import run_llmstack as llmstack  # noqa: E402
from tests.support.tiny_model import build_tiny_llama  # noqa: E402

MODEL = "tiny"
API_KEY = "sk-fault-injection"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
HUNG_AFTER = 30.0  # a stream silent this long counts as hung


# -- one streaming client ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one streaming client saw.  Times are `time.monotonic()` values."""

    started: float
    first_token: float | None = None
    ended: float | None = None
    status: str = "running"  # completed | error_event | http_error | hung | broken
    tokens: int = 0
    detail: str = ""


def stream_chat(client: httpx.Client, api_url: str, outcome: Outcome, max_tokens: int, model: str = MODEL) -> Outcome:
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0.8,
    }
    finished = done = False
    try:
        with client.stream(
            "POST",
            f"{api_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(HUNG_AFTER, connect=5.0),
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                outcome.status, outcome.detail = "http_error", f"{resp.status_code} {resp.text[:200]}"
                return outcome
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.status, outcome.detail = "error_event", event["error"].get("message", "")
                    continue
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        outcome.tokens += 1
                        if outcome.first_token is None:
                            outcome.first_token = time.monotonic()
                    if choice.get("finish_reason"):
                        finished = True
        if outcome.status == "running":
            outcome.status = "completed" if finished and done else "broken"
    except httpx.ReadTimeout:
        outcome.status = "hung"
    except httpx.HTTPError as exc:
        outcome.status, outcome.detail = "broken", f"{type(exc).__name__}: {exc}"
    finally:
        outcome.ended = time.monotonic()
    return outcome


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    c = {"sent": len(outcomes), "completed": 0, "errored": 0, "hung": 0, "broken": 0}
    for o in outcomes:
        if o.status == "completed":
            c["completed"] += 1
        elif o.status in ("error_event", "http_error"):
            c["errored"] += 1
        elif o.status == "hung":
            c["hung"] += 1
        else:
            c["broken"] += 1
    return c


# -- a stack under `llmstack up` ------------------------------------------------------------------------------


@dataclass
class UpStack:
    """A stack.toml with two replicas of a local model, run with `llmstack up --detach`."""

    root: Path
    model_dir: Path
    replicas: int = 2
    concurrency: int = 16
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {"controller": free_port(), "api": free_port()}
        self.config = self.root / "stack.toml"
        self.run_dir = self.root / "run"
        self.api_url = f"http://127.0.0.1:{self.ports['api']}"
        self.controller_url = f"http://127.0.0.1:{self.ports['controller']}"
        self.config.write_text(
            f"""
[stack]
name = "faults"
run_dir = "run"
drain_timeout = 5
start_timeout = 180
restart_backoff = 0.2
restart_backoff_max = 1
crash_loop_restarts = 5
crash_loop_window = 60

[controller]
port = {self.ports["controller"]}
heartbeat_expiry = 2

[[models]]
model = "{self.model_dir}"
source = "local"
names = ["{MODEL}"]
device = "cpu"
replicas = {self.replicas}
heartbeat_interval = 0.5
limit_worker_concurrency = {self.concurrency}

[api]
port = {self.ports["api"]}
sync_interval = 0.2
api_keys = ["{API_KEY}"]

[webui]
enabled = false
"""
        )

    def up(self) -> None:
        result = llmstack("up", "--detach", "-c", str(self.config))
        if result.returncode != 0:
            output = result.stdout + result.stderr
            raise RuntimeError(f"llmstack up failed ({result.returncode}):\n{output}{self.logs()}")

    def down(self) -> None:
        llmstack("down", "-c", str(self.config), "--timeout", "3", timeout=120)

    def state(self) -> RunState:
        state = RunDir(self.run_dir).read_state()
        assert state is not None, f"no state in {self.run_dir}"
        return state

    def workers(self) -> list[ServiceRecord]:
        return [s for s in self.state().services if s.role == "workers"]

    def service(self, name: str) -> ServiceRecord:
        return self.state().service(name)

    def token(self) -> str:
        return (self.run_dir / "cluster_token").read_text().strip()

    def registered(self) -> int:
        """Workers in the controller's table (0 while it is down)."""
        try:
            resp = httpx.get(
                f"{self.controller_url}/workers", headers={"Authorization": f"Bearer {self.token()}"}, timeout=1
            )
            return len(resp.json()["workers"]) if resp.status_code == 200 else 0
        except httpx.HTTPError:
            return 0

    def routable(self) -> int:
        """Workers the API server would send a request to now."""
        try:
            return int(httpx.get(f"{self.api_url}/health", timeout=1).json()["workers"].get(MODEL, 0))
        except (httpx.HTTPError, ValueError, KeyError):
            return -1

    def logs(self, lines: int = 40) -> str:
        out = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            out.append(f"--- {log.name} ---\n{tail}")
        return "\n".join(out)


@contextmanager
def running_stack(root: Path, model_dir: Path, **kwargs: Any) -> Iterator[UpStack]:
    stack = UpStack(root, model_dir, **kwargs)
    try:
        stack.up()
        wait_for(lambda: stack.routable() == stack.replicas, 60, "every worker routable")
        yield stack
    finally:
        stack.down()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> float:
    """Seconds until `predicate()` held; raises TimeoutError after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _generated(url: str) -> int:
    try:
        return int(httpx.get(f"{url}/health", timeout=5).json()["generated_tokens"])
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


def _served(url: str) -> int:
    try:
        return int(httpx.get(f"{url}/health", timeout=2).json()["served"])
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


# -- scenarios ------------------------------------------------------------------------------------------------
def kill_worker_scenario(stack: UpStack, clients: int = 32, max_tokens: int = 64) -> dict[str, Any]:
    """SIGKILL one worker while `clients` streams run, start `clients` more right after, then wait for the
    supervisor to bring the worker back and for it to take traffic."""
    victim = stack.workers()[0]
    assert victim.proc is not None
    restarts_before = victim.restarts
    generated_before = _generated(victim.url)
    outcomes_before: list[Outcome] = []
    outcomes_after: list[Outcome] = []
    with (
        httpx.Client(limits=httpx.Limits(max_connections=4 * clients)) as client,
        ThreadPoolExecutor(2 * clients) as pool,
    ):

        def launch(into: list[Outcome]) -> None:
            outcome = Outcome(started=time.monotonic())
            into.append(outcome)
            pool.submit(stream_chat, client, stack.api_url, outcome, max_tokens)

        for _ in range(clients):
            launch(outcomes_before)
        # kill mid-load: once half the streams are producing tokens, the victim's among them
        wait_for(lambda: sum(o.first_token is not None for o in outcomes_before) >= clients // 2, 120, "tokens")
        try:
            wait_for(lambda: _generated(victim.url) > generated_before + clients, 30, "the victim to stream")
        except TimeoutError:  # kill anyway; `victim_tokens_before_kill` tells what it was doing
            pass
        victim_tokens = _generated(victim.url) - generated_before
        streaming_at_kill = sum(o.first_token is not None and o.ended is None for o in outcomes_before)
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        for _ in range(clients):
            launch(outcomes_after)
        wait_for(lambda: stack.routable() < stack.replicas, 30, "the dead worker to leave routing")
        left_routing = time.monotonic() - killed
        wait_for(lambda: all(o.ended is not None for o in outcomes_before + outcomes_after), 3 * HUNG_AFTER, "ends")

    # the supervisor restarts the worker; it registers again and takes traffic
    def restarted() -> bool:
        rec = stack.service(victim.name)
        return rec.restarts > restarts_before and rec.state == ServiceState.RUNNING

    wait_for(restarted, 120, "the supervisor to restart the worker")
    back = time.monotonic() - killed
    wait_for(lambda: stack.routable() == stack.replicas, 60, "the worker back in routing")
    back_in_routing = time.monotonic() - killed
    served_before = _served(victim.url)
    recovery: list[Outcome] = []
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:

        def takes_traffic() -> bool:
            batch = [Outcome(started=time.monotonic()) for _ in range(8)]
            recovery.extend(batch)
            list(pool.map(lambda o: stream_chat(client, stack.api_url, o, 4), batch))
            return _served(victim.url) > max(served_before, 0)

        wait_for(takes_traffic, 60, "the restarted worker to take traffic", interval=0)
    takes_traffic_after = time.monotonic() - killed

    errors = [o for o in outcomes_before if o.status in ("error_event", "http_error")]
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "streaming_at_kill": streaming_at_kill,
        "victim_tokens_before_kill": victim_tokens,
        "before_kill": counts(outcomes_before),
        "after_kill": counts(outcomes_after),
        "recovery_requests": counts(recovery),
        "errors_ended_within_s": round(max((o.ended or 0) - killed for o in errors), 3) if errors else None,
        "left_routing_after_s": round(left_routing, 3),
        "worker_restarted_after_s": round(back, 3),
        "back_in_routing_after_s": round(back_in_routing, 3),
        "takes_traffic_after_s": round(takes_traffic_after, 3),
        "error_messages": sorted({o.detail for o in errors})[:5],
        "_outcomes": {"before": [asdict(o) for o in outcomes_before], "after": [asdict(o) for o in outcomes_after]},
        "_killed_at": killed,
    }


def controller_restart_scenario(stack: UpStack, clients: int = 32, max_tokens: int = 8) -> dict[str, Any]:
    """SIGKILL the controller while `clients` loop on short streams; the supervisor restarts it.  Load
    goes on until every worker is registered again and a little longer."""
    controller = stack.service("controller")
    assert controller.proc is not None
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()

    def loop(client: httpx.Client) -> None:
        while not stop.is_set():
            outcome = Outcome(started=time.monotonic())
            with lock:
                outcomes.append(outcome)
            stream_chat(client, stack.api_url, outcome, max_tokens)

    with httpx.Client(limits=httpx.Limits(max_connections=2 * clients)) as client, ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(loop, client) for _ in range(clients)]
        time.sleep(2.0)
        os.kill(controller.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: stack.registered() == 0, 30, "the controller to be down")
        wait_for(lambda: stack.registered() > 0, 60, "the controller back")
        controller_back = time.monotonic() - killed
        wait_for(lambda: stack.registered() == stack.replicas, 60, "workers registered again")
        reregistered = time.monotonic() - killed
        time.sleep(3.0)  # past the restarted controller's warm-up: its own table is used again
        stop.set()
        for future in futures:
            future.result()
    return {
        "clients": clients,
        "requests": counts(outcomes),
        "controller_back_after_s": round(controller_back, 3),
        "workers_registered_again_after_s": round(reregistered, 3),
        "routable_after": stack.routable(),
        "error_messages": sorted({o.detail for o in outcomes if o.status != "completed"})[:5],
    }


def _public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream in the kill scenario")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "model")
        with running_stack(Path(tmp), model) as stack:
            kill = kill_worker_scenario(stack, args.clients, args.max_tokens)
            ctrl = controller_restart_scenario(stack, args.clients)
    report = {"kill_worker": _public(kill), "restart_controller": _public(ctrl)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, figures in report.items():
        print(f"== {name}")
        for key, value in figures.items():
            print(f"  {key:34} {value}")


if __name__ == "__main__":
    main()
