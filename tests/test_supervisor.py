"""The supervisor's loop with a fake clock, fake processes and a fake health check: start order and
gating, start failures, restart backoff, crash-loop detection and tiered stop, without real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.stack.logs import LogFollower, merge_logs
from llmstack.stack.plan import Plan, Policy, ServiceSpec
from llmstack.stack.rundir import Phase, RunDir, ServiceState
from llmstack.stack.supervisor import Supervisor


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeChild:
    _next_pid = 100

    def __init__(self, name: str, world: World) -> None:
        FakeChild._next_pid += 1
        self.pid = FakeChild._next_pid
        self.name = name
        self.world = world
        self.code: int | None = None
        self.terminated_at: float | None = None

    def poll(self) -> int | None:
        return self.code

    def ref(self) -> None:
        return None

    def terminate(self) -> None:
        self.terminated_at = self.world.clock.now()
        self.world.events.append(("terminate", self.name))
        self.code = 0  # drains at once

    def kill(self) -> None:
        if self.code is None:
            self.world.events.append(("kill", self.name))
            self.code = -9


class World:
    """Processes that become healthy `ready_after` seconds after spawn (or die when told to)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.events: list[tuple[str, str]] = []
        self.children: dict[str, FakeChild] = {}
        self.spawned_at: dict[str, float] = {}
        self.ready_after: dict[str, float] = {}
        self.die_on_start: set[str] = set()
        self.spawns: dict[str, int] = {}

    def factory(self, spec: ServiceSpec, env: dict[str, str], log_path: Path) -> FakeChild:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"2025-01-01 00:00:00,000 INFO {spec.name}: hello from {spec.name}\n")
        child = FakeChild(spec.name, self)
        self.events.append(("spawn", spec.name))
        self.children[spec.name] = child
        self.spawned_at[spec.name] = self.clock.now()
        self.spawns[spec.name] = self.spawns.get(spec.name, 0) + 1
        if spec.name in self.die_on_start:
            child.code = 1
        self.last_env = env
        return child

    def health(self, spec: ServiceSpec) -> bool:
        child = self.children.get(spec.name)
        if child is None or child.code is not None:
            return False
        return self.clock.now() - self.spawned_at[spec.name] >= self.ready_after.get(spec.name, 0.5)


def _spec(name: str, role: str, **kw: object) -> ServiceSpec:
    return ServiceSpec(name=name, role=role, argv=["x"], host="127.0.0.1", port=1, url="u", health_url="h", **kw)  # type: ignore[arg-type]


def _plan(**policy: float) -> Plan:
    return Plan(
        stack="t",
        run_id="r1",
        policy=Policy(poll_interval=0.1, **policy),
        services=[
            _spec("api", "api", secret_env=["LLMSTACK_API_KEYS"]),
            _spec("w1", "workers"),
            _spec("controller", "controller"),
            _spec("w2", "workers"),
        ],
    )


@pytest.fixture
def world() -> World:
    return World(FakeClock())


def _sup(world: World, tmp_path: Path, **policy: float) -> Supervisor:
    return Supervisor(
        _plan(**policy),
        RunDir(tmp_path / "run"),
        factory=world.factory,
        clock=world.clock,
        health=world.health,
        secrets={"LLMSTACK_API_KEYS": "k1", "LLMSTACK_CLUSTER_TOKEN": "t"},
        base_env={"PATH": "/bin", "LLMSTACK_API_KEYS": "from-shell"},
    )


def test_start_order_is_gated_on_health_and_workers_start_together(world: World, tmp_path: Path) -> None:
    world.ready_after.update(controller=2.0, w1=5.0, w2=3.0, api=1.0)
    sup = _sup(world, tmp_path)
    assert sup.start()
    spawns = [(n, world.spawned_at[n]) for kind, n in world.events if kind == "spawn"]
    assert [n for n, _ in spawns] == ["controller", "w1", "w2", "api"]
    t0 = spawns[0][1]
    assert world.spawned_at["w1"] == world.spawned_at["w2"] >= t0 + 2.0  # after controller healthy, together
    assert world.spawned_at["api"] >= world.spawned_at["w1"] + 5.0  # after the slower worker
    assert sup.state.phase == Phase.READY
    assert all(r.state == ServiceState.RUNNING for r in sup.state.services)
    assert sup.state.service("w1").first_ready_after == pytest.approx(5.0, abs=0.11)
    saved = RunDir(tmp_path / "run").read_state()
    assert saved is not None and saved.phase == Phase.READY and saved.timings["workers"] >= 5.0


def test_secrets_reach_only_the_services_that_need_them(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path)
    env_api = sup.child_env(sup.slots["api"].spec)
    env_worker = sup.child_env(sup.slots["w1"].spec)
    assert env_api["LLMSTACK_API_KEYS"] == "k1"
    assert "LLMSTACK_API_KEYS" not in env_worker  # not even the copy inherited from the shell
    assert env_worker["LLMSTACK_RUN_ID"] == "r1"


def test_failure_during_start_aborts_and_stops_what_was_started(world: World, tmp_path: Path) -> None:
    world.die_on_start.add("w2")
    sup = _sup(world, tmp_path)
    assert not sup.start()
    assert sup.state.phase == Phase.FAILED
    assert "w2 exited with exit code 1 before it was healthy" in (sup.state.message or "")
    assert "hello from w2" in (sup.state.message or "")  # the log tail is quoted
    assert "api" not in world.spawns  # later tiers never started
    assert ("terminate", "controller") in world.events and ("terminate", "w1") in world.events
    assert sup.state.service("w2").state == ServiceState.FAILED
    assert sup.state.service("controller").state == ServiceState.STOPPED


def test_start_timeout_aborts(world: World, tmp_path: Path) -> None:
    world.ready_after["w1"] = 1e9
    sup = _sup(world, tmp_path, start_timeout=30)
    assert not sup.start()
    assert "w1 not healthy after 30s" in (sup.state.message or "")


def _run_until(sup: Supervisor, world: World, seconds: float) -> None:
    end = world.clock.now() + seconds
    while world.clock.now() < end:
        sup.tick()
        world.clock.sleep(sup.policy.poll_interval)


def test_crash_is_restarted_with_exponential_backoff(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path, restart_backoff=1.0, restart_backoff_max=3.0, crash_loop_restarts=10)
    assert sup.start()
    delays = []
    for _ in range(4):
        world.children["w1"].code = -9
        died = world.clock.now()
        sup.tick()
        assert sup.state.service("w1").state == ServiceState.BACKOFF
        spawns = world.spawns["w1"]
        while world.spawns["w1"] == spawns:
            sup.tick()
            world.clock.sleep(0.1)
        delays.append(round(world.spawned_at["w1"] - died))
        assert sup.state.service("w1").state == ServiceState.RESTARTING
        _run_until(sup, world, 1.0)
        assert sup.state.service("w1").state == ServiceState.RUNNING
    assert delays == [1, 2, 3, 3]  # doubles, capped at restart_backoff_max
    assert sup.state.service("w1").restarts == 4
    assert sup.state.service("w1").last_exit == -9


def test_crash_loop_stops_retrying_and_reports_log_tail(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path, restart_backoff=0.5, crash_loop_restarts=3, crash_loop_window=60)
    assert sup.start()
    world.die_on_start.add("w1")  # every restart dies at once
    world.children["w1"].code = 1
    _run_until(sup, world, 30)
    rec = sup.state.service("w1")
    assert rec.state == ServiceState.FAILED
    assert rec.restarts == 3 and world.spawns["w1"] == 4
    assert "crash loop: exited 4 times within 60s" in (rec.message or "")
    log = (tmp_path / "run" / "logs" / "supervisor.log").read_text()
    assert "crash loop" in log and "hello from w1" in log
    _run_until(sup, world, 120)
    assert world.spawns["w1"] == 4  # never retried again
    assert sup.state.service("w2").state == ServiceState.RUNNING  # the rest keeps serving


def test_crashes_spread_out_are_not_a_loop(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path, restart_backoff=0.5, crash_loop_restarts=2, crash_loop_window=10)
    assert sup.start()
    for _ in range(5):
        world.children["w1"].code = 1
        _run_until(sup, world, 15)
        assert sup.state.service("w1").state == ServiceState.RUNNING
    assert sup.state.service("w1").restarts == 5


def test_stop_goes_in_tiers_api_first_controller_last(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path)
    assert sup.start()
    sup.stop_all(5.0)
    order = [n for kind, n in world.events if kind == "terminate"]
    assert order[0] == "api" and order[-1] == "controller" and set(order[1:3]) == {"w1", "w2"}
    assert sup.state.phase == Phase.STOPPED
    assert all(r.state == ServiceState.STOPPED for r in sup.state.services)


def test_run_stops_on_request(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path)
    sup.run(on_ready=lambda s: s.request_stop())
    assert sup.state.phase == Phase.STOPPED


def test_merge_logs_interleaves_by_time_and_keeps_tracebacks_together() -> None:
    merged = merge_logs(
        {
            "a": ["2025-01-01 00:00:01,000 one", "2025-01-01 00:00:03,000 three", "Traceback", "  boom"],
            "b": ["2025-01-01 00:00:02,000 two", "2025-01-01 00:00:04,000 four"],
        }
    )
    assert [line.split(" ")[-1] for _, line in merged] == ["one", "two", "three", "Traceback", "boom", "four"]


def test_log_follower_yields_only_complete_new_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("old\n")
    follower = LogFollower({"x": log})
    with log.open("a") as fh:
        fh.write("new 1\npart")
    assert follower.poll() == [("x", "new 1")]
    with log.open("a") as fh:
        fh.write("ial\n")
    assert follower.poll() == [("x", "partial")]
