"""The controller's registry and dispatch (with an injected clock), and its HTTP surface."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from llmstack.common.errors import Conflict, NotFound, ServiceUnavailable
from llmstack.common.wire import Heartbeat, WorkerRegistration, WorkerStatus
from llmstack.services.controller import ControllerSettings, Registry
from llmstack.services.dispatch import Candidate, choose
from tests.support.procs import Service, free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reg(address: str, worker_id: str = "w1", names: tuple[str, ...] = ("m",), speed: float = 1.0) -> WorkerRegistration:
    return WorkerRegistration(
        worker_id=worker_id,
        worker_address=address,
        model_names=list(names),
        context_length=2048,
        status=WorkerStatus(speed=speed),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Registry:
    return Registry(ControllerSettings(heartbeat_expiry=10), clock=clock)


def test_silent_worker_expires_and_must_register_again(registry: Registry, clock: Clock) -> None:
    registry.register(reg("http://127.0.0.1:1"))
    assert registry.models() == ["m"]
    clock.now += 9
    beat = Heartbeat(worker_id="w1", worker_address="http://127.0.0.1:1", status=WorkerStatus())
    assert registry.heartbeat(beat)
    clock.now += 9
    assert registry.models() == ["m"]
    clock.now += 2  # 11 s since the last heartbeat
    assert registry.models() == []
    assert registry.expire() == ["http://127.0.0.1:1"]
    assert not registry.heartbeat(beat)  # the worker learns it must register again
    registry.register(reg("http://127.0.0.1:1"))
    assert registry.models() == ["m"]


def test_duplicate_registration_is_409_but_a_new_process_replaces(registry: Registry) -> None:
    registry.register(reg("http://127.0.0.1:1", "w1"))
    with pytest.raises(Conflict):
        registry.register(reg("http://127.0.0.1:1", "w1"))
    registry.register(reg("http://127.0.0.1:1", "w2", names=("other",)))  # restarted worker, same port
    assert registry.models() == ["other"]


def test_lookup_unknown_is_404_and_dead_is_503(registry: Registry, clock: Clock) -> None:
    with pytest.raises(NotFound):
        registry.lookup("nope")
    registry.register(reg("http://127.0.0.1:1"))
    assert registry.lookup("m") == "http://127.0.0.1:1"
    clock.now += 60
    with pytest.raises(ServiceUnavailable):
        registry.lookup("m")


def test_shortest_queue_breaks_ties_fairly() -> None:
    rng = random.Random(0)
    candidates = [Candidate(f"w{i}", 1.0, 2) for i in range(3)]
    counts = Counter(choose(candidates, "shortest_queue", rng).address for _ in range(3000))
    assert set(counts) == {"w0", "w1", "w2"}
    assert min(counts.values()) > 800  # FastChat would send all 3000 to w0
    busy = [Candidate("idle", 1.0, 0), Candidate("busy", 1.0, 5)]
    assert {choose(busy, "shortest_queue", rng).address for _ in range(100)} == {"idle"}
    fast = [Candidate("fast", 4.0, 4), Candidate("slow", 1.0, 2)]  # 4/4=1 < 2/1=2
    assert choose(fast, "shortest_queue", rng).address == "fast"


def test_lottery_is_weighted_by_speed() -> None:
    rng = random.Random(1)
    candidates = [Candidate("fast", 3.0, 0), Candidate("slow", 1.0, 0)]
    counts = Counter(choose(candidates, "lottery", rng).address for _ in range(4000))
    assert 0.70 < counts["fast"] / 4000 < 0.80


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    svc = Service(
        "controller",
        ["controller", "--port", str(port), "--cluster-token", "s3cret"],
        tmp_path_factory.mktemp("controller"),
    ).start()
    try:
        svc.wait_healthy(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        svc.stop()


AUTH = {"Authorization": "Bearer s3cret"}
GOOD = reg("http://127.0.0.1:59999", "w-http").model_dump()


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (GOOD, {}, 401),
        (GOOD, {"Authorization": "Bearer wrong"}, 401),
        (b"{not json", AUTH, 400),
        ({"worker_id": "x"}, AUTH, 400),
        ({**GOOD, "worker_address": "ftp://127.0.0.1:1"}, AUTH, 400),
        ({**GOOD, "worker_address": "http://user:pw@127.0.0.1:1"}, AUTH, 400),
        ({**GOOD, "model_names": []}, AUTH, 400),
        ({**GOOD, "model_names": ["a", "a"]}, AUTH, 400),
        ({**GOOD, "context_length": -1}, AUTH, 400),
        ({**GOOD, "unexpected": 1}, AUTH, 400),
    ],
)
def test_registration_rejects_bad_input(controller: str, body: object, headers: dict, status: int) -> None:
    if isinstance(body, bytes):
        resp = httpx.post(f"{controller}/workers/register", content=body, headers=headers)
    else:
        resp = httpx.post(f"{controller}/workers/register", json=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert "error" in resp.json() and resp.json()["error"]["message"]


def test_registration_flow_over_http(controller: str) -> None:
    body = reg("http://127.0.0.1:59998", "w-flow", names=("flow-model",)).model_dump()
    assert httpx.post(f"{controller}/workers/register", json=body, headers=AUTH).status_code == 200
    dup = httpx.post(f"{controller}/workers/register", json=body, headers=AUTH)
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "already_registered"
    assert "flow-model" in httpx.get(f"{controller}/models").json()["models"]
    found = httpx.post(f"{controller}/workers/lookup", json={"model": "flow-model"}, headers=AUTH)
    assert found.json() == {"address": "http://127.0.0.1:59998"}
    missing = httpx.post(f"{controller}/workers/lookup", json={"model": "ghost"}, headers=AUTH)
    assert missing.status_code == 404
    assert httpx.get(f"{controller}/workers").status_code == 401  # the table is guarded too
    table = httpx.get(f"{controller}/workers", headers=AUTH).json()
    assert any(w["worker_id"] == "w-flow" for w in table["workers"])
    unreg = {"worker_id": "w-flow", "worker_address": "http://127.0.0.1:59998"}
    assert httpx.post(f"{controller}/workers/unregister", json=unreg, headers=AUTH).json() == {"unregistered": True}
    assert "flow-model" not in httpx.get(f"{controller}/models").json()["models"]
