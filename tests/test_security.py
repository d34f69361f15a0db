"""Guards and fault bookkeeping that need no model: cluster-token checks (counted when refused), worker address
validation, the routing table across controller restarts and worker failures, admission limits, and the
warning on public binds without keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from llmstack.common.errors import Overloaded, ServiceUnavailable
from llmstack.common.wire import WorkerEntry, WorkerRegistration, WorkerStatus, WorkerTable
from llmstack.services.api.routing import RoutingTable
from llmstack.services.controller import ControllerSettings, build_controller_app
from llmstack.services.worker.admission import Admission
from tests.support.procs import Service, free_port

TOKEN = "cluster-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def registration(address: str = "http://10.0.0.2:21002", worker_id: str = "w1") -> dict:
    return {"worker_id": worker_id, "worker_address": address, "model_names": ["m"], "context_length": 2048}


@pytest.mark.parametrize(
    "address",
    [
        "http://10.0.0.2:99999",  # port out of range
        "http://10.0.0.2:0",
        "http://10.0.0.2:abc",
        "http://10.0.0.2:21002/generate",  # a path: requests would go elsewhere
        "http://10.0.0.2:21002?x=1",
        "http://10.0.0.2:21002#frag",
        "http://bad host:21002",
        "http://10.0.0.2:21002\r\nX-Injected: 1",
        "http://ümlaut.example:21002",
        "gopher://10.0.0.2:70",
        "file:///etc/passwd",
        "http://:21002",
        "http://user@10.0.0.2:21002",
    ],
)
def test_bad_worker_addresses_are_rejected(address: str) -> None:
    with pytest.raises(ValidationError):
        WorkerRegistration.model_validate(registration(address))


def test_good_worker_addresses_are_normalised() -> None:
    for address in ("http://10.231.0.2:21002/", "https://worker.internal:443", "http://[::1]:21002"):
        assert WorkerRegistration.model_validate(registration(address)).worker_address == address.rstrip("/")


@pytest.fixture
def controller() -> Iterator[TestClient]:
    app = build_controller_app(ControllerSettings(heartbeat_expiry=30, cluster_token=TOKEN))
    with TestClient(app) as client:
        yield client


def test_every_worker_route_needs_the_cluster_token(controller: TestClient) -> None:
    beat = {"worker_id": "w1", "worker_address": "http://10.0.0.2:21002", "status": {}}
    calls = [
        ("post", "/workers/register", registration()),
        ("post", "/workers/heartbeat", beat),
        ("post", "/workers/unregister", {"worker_id": "w1", "worker_address": "http://10.0.0.2:21002"}),
        ("post", "/workers/lookup", {"model": "m"}),
        ("get", "/workers", None),
    ]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            resp = getattr(controller, method)(path, json=body, headers=headers) if body else controller.get(path)
            assert resp.status_code == 401, (path, headers, resp.text)
            assert resp.json()["error"]["type"] == "authentication_error"
            assert TOKEN not in resp.text
    assert controller.get("/health").json()["workers"] == 0  # nothing was registered, nothing is routed
    refused = [line for line in controller.get("/metrics").text.splitlines() if 'event="refused"' in line]
    assert refused and float(refused[0].split()[-1]) >= 15
    assert controller.post("/workers/register", json=registration(), headers=AUTH).status_code == 200
    assert controller.get("/workers", headers=AUTH).json()["workers"][0]["worker_address"] == "http://10.0.0.2:21002"


def test_a_fresh_controller_says_it_is_warming_up() -> None:
    app = build_controller_app(ControllerSettings(heartbeat_expiry=0.3))
    with TestClient(app) as client:
        assert client.get("/workers").json()["warming_up"] is True
        time.sleep(0.35)
        assert client.get("/workers").json()["warming_up"] is False


# -- routing table ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def entry(address: str, worker_id: str) -> WorkerEntry:
    return WorkerEntry(
        worker_id=worker_id,
        worker_address=address,
        model_names=["m"],
        context_length=2048,
        status=WorkerStatus(),
        heartbeat_age=0.0,
        registered_at=0.0,
    )


A, B = "http://127.0.0.1:1", "http://127.0.0.1:2"


def table(*entries: WorkerEntry, warming_up: bool = False) -> WorkerTable:
    return WorkerTable(dispatch_method="shortest_queue", workers=list(entries), warming_up=warming_up)


def routing(healthy: set[str]) -> tuple[RoutingTable, Clock]:
    def handler(request: httpx.Request) -> httpx.Response:
        address = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if address in healthy:
            return httpx.Response(200, json={"status": "ok"})
        raise httpx.ConnectError("refused", request=request)

    clock = Clock()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return RoutingTable("http://controller", client, failure_cooldown=1.0, clock=clock), clock


def test_restarted_controller_does_not_empty_the_routing_table() -> None:
    router, _ = routing(set())
    router.apply(table(entry(A, "a"), entry(B, "b")))
    router.apply(table(entry(A, "a"), warming_up=True))  # b has not registered again yet
    assert router.usable() == {"m": 2}
    router.apply(table(entry(A, "a")))  # warm-up over: the controller's word counts again
    assert router.usable() == {"m": 1}


def test_failed_worker_stays_out_until_it_answers_again() -> None:
    healthy: set[str] = set()
    router, clock = routing(healthy)
    router.apply(table(entry(A, "a"), entry(B, "b")))
    router.mark_failed(router.routes[A], "ConnectError")
    assert router.usable() == {"m": 1}
    assert all(router.pick("m").address == B for _ in range(20))
    clock.now += 5
    asyncio.run(router.probe_failed())  # still dead: stays out, however long ago it failed
    assert router.usable() == {"m": 1}
    router.apply(table(entry(A, "a"), entry(B, "b"), warming_up=True))  # a warm-up does not resurrect it
    assert router.usable() == {"m": 1}
    healthy.add(A)
    asyncio.run(router.probe_failed())
    assert router.usable() == {"m": 2}

    router.mark_failed(router.routes[B], "ReadTimeout")
    router.mark_failed(router.routes[A], "ConnectError")
    with pytest.raises(ServiceUnavailable):
        router.pick("m")
    router.apply(table(entry(A, "a2"), entry(B, "b")))  # a new process at A's address
    assert router.pick("m").address == A


# -- admission -------------------------------------------------------------------------------------------------
def test_admission_queue_limit_and_zero_queue() -> None:
    async def scenario(limit: int, max_queue: int) -> int:
        admission = Admission(limit, max_queue)
        release = asyncio.Event()
        rejected = 0

        async def one() -> None:
            nonlocal rejected
            try:
                async with admission.slot():
                    await release.wait()
            except Overloaded:
                rejected += 1

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(*tasks)
        return rejected

    assert asyncio.run(scenario(1, 0)) == 4  # no waiting at all, but the free slot is used
    assert asyncio.run(scenario(1, 2)) == 2
    assert asyncio.run(scenario(5, 0)) == 0


# -- public binds ------------------------------------------------------------------------------------------------
def test_public_bind_without_keys_or_token_warns_loudly(tmp_path: Path) -> None:
    controller_port, api_port = free_port(), free_port()
    with Service("controller", ["controller", "--host", "0.0.0.0", "--port", str(controller_port)], tmp_path) as c:
        c.wait_healthy(f"http://127.0.0.1:{controller_port}/health")
        args = ["api", "--host", "0.0.0.0", "--port", str(api_port)]
        with Service("api", [*args, "--controller-address", f"http://127.0.0.1:{controller_port}"], tmp_path) as a:
            a.wait_healthy(f"http://127.0.0.1:{api_port}/health")
            assert "warning: the API server listens on 0.0.0.0 without --api-keys" in a.log_text()
        assert "warning: the controller listens on 0.0.0.0 without --cluster-token" in c.log_text()
    quiet_port = free_port()
    with Service("quiet", ["controller", "--port", str(quiet_port)], tmp_path) as q:
        q.wait_healthy(f"http://127.0.0.1:{quiet_port}/health")
        assert "warning" not in q.log_text().lower()


def test_in_flight_counts_survive_table_syncs() -> None:
    router, _ = routing(set())
    router.apply(table(entry(A, "a"), entry(B, "b")))
    route = router.pick("m")
    route.inflight += 1  # a request under way while the table is synced
    router.apply(table(entry(A, "a"), entry(B, "b")))
    route.inflight -= 1
    assert [r.inflight for r in router.routes.values()] == [0, 0]


def test_a_refused_routing_sync_is_a_warning_naming_the_token_once(caplog: pytest.LogCaptureFixture) -> None:
    answers = iter([401, 401, 200, 401])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        body = table(entry(A, "a")).model_dump(mode="json") if status == 200 else {"error": {"message": "no"}}
        return httpx.Response(status, json=body)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    router = RoutingTable("http://controller", client)
    with caplog.at_level("INFO", logger="llmstack.api.routing"):
        assert [asyncio.run(router.sync_once()) for _ in range(4)] == [False, False, True, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # once per failure, not per sync; again after it had recovered
    assert "HTTP 401" in warnings[0] and "--cluster-token" in warnings[0]
    assert any("works again" in r.getMessage() for r in caplog.records if r.levelname == "INFO")
