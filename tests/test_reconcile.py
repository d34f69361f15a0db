"""`up` on a running stack, without processes: the diff of two plans, stable worker ports, and the supervisor
applying a new plan (fake clock, fake children, fake health, as in test_supervisor.py)."""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path

import pytest

from llmstack.stack.config import parse_config
from llmstack.stack.plan import ModelPlan, Plan, Policy, ServiceSpec, build_specs, secret_digests
from llmstack.stack.reconcile import (
    ReconcileRequest,
    ReconcileResult,
    argv_changes,
    diff_plans,
    keep_worker_ports,
    request_path,
    result_path,
)
from llmstack.stack.reconcile_apply import apply_pending
from llmstack.stack.rundir import RunDir, ServiceState
from llmstack.stack.supervisor import Supervisor, install_signal_handlers
from tests.test_supervisor import FakeClock, World

SECRETS = {"LLMSTACK_API_KEYS": "k1", "LLMSTACK_CLUSTER_TOKEN": "t"}


def _spec(name: str, role: str, *flags: str, models: list[str] | None = None, **kw: object) -> ServiceSpec:
    return ServiceSpec(
        name=name, role=role, argv=["py", "-m", "llmstack", role, *flags], host="127.0.0.1", port=1, url="u",  # type: ignore[arg-type]
        health_url="h", models=models or [], **kw,
    )  # fmt: skip


def _plan(services: list[ServiceSpec], secrets: dict[str, str] | None = None, **policy: float) -> Plan:
    return Plan(
        stack="t",
        run_id="r1",
        policy=Policy(poll_interval=0.1, **policy),
        services=services,
        secret_digests=secret_digests(services, SECRETS if secrets is None else secrets, "r1"),
    )


def _base() -> list[ServiceSpec]:
    return [
        _spec("controller", "controller", "--port", "9", secret_env=["LLMSTACK_CLUSTER_TOKEN"]),
        _spec("worker-a", "workers", "--port", "10", models=["a"]),
        _spec("worker-b", "workers", "--port", "11", "--heartbeat-interval", "0.5", models=["b"]),
        _spec("api", "api", "--port", "12", expect_models=["a", "b"], secret_env=["LLMSTACK_API_KEYS"]),
    ]


def _changed() -> list[ServiceSpec]:
    """b's heartbeat changes, c is added, the API server expects c too."""
    s = _base()
    s[2] = _spec("worker-b", "workers", "--port", "11", "--heartbeat-interval", "0.6", models=["b"])
    s.insert(3, _spec("worker-c", "workers", "--port", "13", models=["c"]))
    s[4] = _spec("api", "api", "--port", "12", expect_models=["a", "b", "c"], secret_env=["LLMSTACK_API_KEYS"])
    return s


def _actions(diff) -> dict[str, str]:  # noqa: ANN001
    return {c.name: c.action.value for c in diff.changes}


def test_diff_restarts_only_what_changed_and_the_api_keeps_running_for_a_new_model() -> None:
    diff = diff_plans(_plan(_base()), _plan(_changed()))
    assert _actions(diff) == {
        "controller": "keep", "worker-a": "keep", "worker-b": "restart", "worker-c": "start", "api": "keep",
    }  # fmt: skip
    b = next(c for c in diff.changes if c.name == "worker-b")
    assert b.reasons == ("--heartbeat-interval 0.5 -> 0.6",)
    assert diff.summary() == "1 to start, 1 to restart, 0 to stop, 3 unchanged"
    assert not diff.empty and not diff.notes and not diff.blockers
    assert diff_plans(_plan(_base()), _plan(_base())).empty


def test_diff_stops_removed_and_says_why_for_env_secrets_and_policy() -> None:
    new = [s for s in _base() if s.name != "worker-b"]
    new[1] = new[1].model_copy(update={"env": {"HF_TOKEN": "hf_secret"}})
    diff = diff_plans(_plan(_base()), _plan(new, {**SECRETS, "LLMSTACK_API_KEYS": "k2"}, start_timeout=60))
    assert _actions(diff) == {"controller": "keep", "worker-a": "restart", "worker-b": "stop", "api": "restart"}
    reasons = {c.name: c.reasons for c in diff.changes}
    assert reasons["worker-a"] == ("env HF_TOKEN added",) and "hf_secret" not in str(diff)
    assert reasons["api"] == ("secret LLMSTACK_API_KEYS changed",) and "k2" not in str(diff)
    assert "[stack] start_timeout 900 -> 60: applied live" in diff.notes
    assert any("API server restarts" in n for n in diff.notes)
    assert not diff_plans(_plan(_base()), _plan(_base(), start_timeout=60)).empty  # a live change is work too


def test_diff_restarts_a_failed_service_and_blocks_a_renamed_stack() -> None:
    diff = diff_plans(_plan(_base()), _plan(_base()), failed={"worker-a"})
    assert _actions(diff)["worker-a"] == "restart" and diff.changes[1].reasons == ("it had failed",)
    renamed = _plan(_base()).model_copy(update={"stack": "other"})
    assert "another stack" in diff_plans(_plan(_base()), renamed).blockers[0]


def test_argv_changes_in_words() -> None:
    old = ["py", "-m", "llmstack", "worker", "--port", "1", "--load-8bit", "--dtype", "float16"]
    new = ["py", "-m", "llmstack", "worker", "--port", "2", "--dtype", "float16", "--seed", "7", "--trust"]
    assert argv_changes(old, new) == ["--port 1 -> 2", "--load-8bit removed", "--seed 7 added", "--trust added"]
    assert argv_changes(["py2", "-m"], ["py3", "-m"]) == ["program py2 -> py3"]


TWO_MODELS = """
[stack]
name = "t"
[[models]]
model = "/m/a"
names = ["a"]
[[models]]
model = "/m/b"
names = ["b"]
"""


def test_workers_without_a_fixed_port_keep_theirs_when_entries_come_and_go() -> None:
    before = parse_config(tomllib.loads(TWO_MODELS))
    running = Plan(stack="t", run_id="r", services=build_specs(before, ["workers", "api"], None))
    ports = {s.name: s.port for s in running.services}
    assert ports["worker-a"] == 21002 and ports["worker-b"] == 21003
    # a is removed, c is added in front: b must not move, c gets a free port
    after = parse_config(tomllib.loads(TWO_MODELS.replace('"/m/a"', '"/m/c"').replace('["a"]', '["c"]')))
    specs = keep_worker_ports(after, build_specs(after, ["workers", "api"], None), running)
    got = {s.name: s for s in specs}
    assert got["worker-b"].port == 21003 and got["worker-c"].port == 21002
    assert got["worker-b"] == next(s for s in running.services if s.name == "worker-b")  # nothing differs
    only_b = parse_config(tomllib.loads('[[models]]\nmodel = "/m/b"\nnames = ["b"]\n'))
    specs = keep_worker_ports(only_b, build_specs(only_b, ["workers"], None), running)
    assert [(s.name, s.port, s.health_url) for s in specs] == [("worker-b", 21003, "http://127.0.0.1:21003/health")]
    assert "--port" in specs[0].argv and specs[0].argv[specs[0].argv.index("--port") + 1] == "21003"


# -- the supervisor applying a plan ----------------------------------------------------------------------------
@pytest.fixture
def world() -> World:
    return World(FakeClock())


def _started(world: World, tmp_path: Path, services: list[ServiceSpec]) -> Supervisor:
    sup = Supervisor(
        _plan(services), RunDir(tmp_path / "run"), factory=world.factory, clock=world.clock, health=world.health,
        secrets=SECRETS, base_env={"PATH": "/bin"},
    )  # fmt: skip
    assert sup.start()
    world.events.clear()
    return sup


def _apply(sup: Supervisor, plan: Plan, secrets: dict[str, str] | None = None) -> ReconcileResult:
    rd = sup.run_dir
    request_path(rd).write_text(ReconcileRequest(id="q1", plan=plan, secrets=secrets or SECRETS).model_dump_json())
    apply_pending(sup)
    assert not request_path(rd).exists()
    return ReconcileResult.model_validate_json(result_path(rd).read_text())


def test_apply_restarts_changed_starts_new_and_leaves_the_rest_alone(world: World, tmp_path: Path) -> None:
    sup = _started(world, tmp_path, _base())
    pids = {name: child.pid for name, child in world.children.items()}
    result = _apply(sup, _plan(_changed()))
    assert result.ok and result.restarted == ["worker-b"] and result.started == ["worker-c"] and not result.stopped
    assert world.events == [("terminate", "worker-b"), ("spawn", "worker-b"), ("spawn", "worker-c")]
    assert world.spawned_at["worker-b"] == world.spawned_at["worker-c"]  # loading side by side
    for name in ("controller", "worker-a", "api"):
        assert world.children[name].pid == pids[name]
    assert world.children["worker-b"].pid != pids["worker-b"]
    assert [r.name for r in sup.state.services] == ["controller", "worker-a", "worker-b", "worker-c", "api"]
    assert all(r.state == ServiceState.RUNNING for r in sup.state.services)
    assert sup.slots["api"].spec.expect_models == ["a", "b", "c"]  # the gate moved, the process did not
    saved = Plan.model_validate_json(sup.run_dir.plan_path.read_text())
    assert [s.name for s in saved.services] == [s.name for s in _changed()]
    state = sup.run_dir.read_state()
    assert state is not None and state.service("worker-c").state == ServiceState.RUNNING
    # and back: removing c stops only c
    result = _apply(sup, _plan([s for s in _changed() if s.name != "worker-c"]))
    assert result.ok and result.stopped == ["worker-c"] and not result.restarted and not result.started
    assert world.events[-1] == ("terminate", "worker-c") and "worker-c" not in sup.slots


def test_replicas_of_one_model_restart_one_at_a_time(world: World, tmp_path: Path) -> None:
    reps = [_spec(f"w-{i}", "workers", "--seed", "1", models=["m"]) for i in range(2)]
    sup = _started(world, tmp_path, reps)
    result = _apply(sup, _plan([_spec(f"w-{i}", "workers", "--seed", "2", models=["m"]) for i in range(2)]))
    assert result.ok
    assert world.events == [("terminate", "w-0"), ("spawn", "w-0"), ("terminate", "w-1"), ("spawn", "w-1")]
    assert world.spawned_at["w-1"] >= world.spawned_at["w-0"] + 0.5  # after w-0 was healthy again


def test_a_new_service_that_fails_is_reported_and_the_stack_keeps_running(world: World, tmp_path: Path) -> None:
    sup = _started(world, tmp_path, _base())
    world.die_on_start.add("worker-c")
    result = _apply(sup, _plan(_changed()))
    assert not result.ok and list(result.failed) == ["worker-c"]
    assert "exited with exit code 1 before it was healthy" in result.failed["worker-c"]
    assert "hello from worker-c" in result.failed["worker-c"]  # its log tail
    assert sup.state.service("worker-c").state == ServiceState.FAILED
    assert sup.state.service("worker-b").state == ServiceState.RUNNING  # the rest of the change went through
    world.die_on_start.clear()
    again = _apply(sup, _plan(_changed()))  # the next `up` tries the failed one again
    assert again.ok and again.restarted == ["worker-c"]


def test_sighup_applies_a_pending_plan_and_otherwise_stops(world: World, tmp_path: Path) -> None:
    sup = _started(world, tmp_path, _base())
    previous = signal.getsignal(signal.SIGHUP)
    try:
        install_signal_handlers(sup)
        request_path(sup.run_dir).write_text("{}")
        os.kill(os.getpid(), signal.SIGHUP)
        assert sup.reconcile_requested and not sup.stop_requested
        request_path(sup.run_dir).unlink()
        os.kill(os.getpid(), signal.SIGHUP)
        assert sup.stop_requested  # a terminal hangup still stops a foreground stack
    finally:
        signal.signal(signal.SIGHUP, previous)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def test_up_only_leaves_the_other_roles_as_they_run(tmp_path: Path) -> None:
    from llmstack.stack.plan import stack_secrets
    from llmstack.stack.reconcile_request import new_plan

    rd = RunDir(tmp_path / "run")
    cfg = parse_config(tomllib.loads(TWO_MODELS))
    roles = ["controller", "workers", "api"]
    specs = build_specs(cfg, roles, None, rd.root)
    running = Plan(
        stack="t", run_id="r", services=specs, secret_digests=secret_digests(specs, stack_secrets(cfg, rd, roles), "r")
    )
    changed = parse_config(tomllib.loads(TWO_MODELS + "[api]\nsync_interval = 0.5\n[controller]\nport = 21100\n"))
    plan, _ = new_plan(changed, ["api"], rd, running, offline=True, dry_run=True, only=True)
    diff = diff_plans(running, plan)
    assert _actions(diff) == {"controller": "keep", "worker-a": "keep", "worker-b": "keep", "api": "restart"}
    assert "--sync-interval 1.0 -> 0.5" in diff.changes[-1].reasons


def test_a_port_held_outside_the_stack_is_refused_before_anything_changes() -> None:
    import socket

    from llmstack.stack.reconcile_request import port_problems

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        running = _plan(_base())
        new = _spec("worker-c", "workers", models=["c"]).model_copy(update={"port": port})
        ours = _spec("worker-d", "workers", models=["d"])  # port 1: one the running stack holds itself
        problems = port_problems(running, [new, ours])
    assert len(problems) == 1 and f"port {port} (worker-c) is already in use" in problems[0]


def test_a_new_on_demand_model_waits_for_its_first_request_and_a_change_does_not_load_it(
    world: World, tmp_path: Path
) -> None:
    sup = _started(world, tmp_path, _base())
    lazy = ModelPlan(name="c", names=["c"], services=["worker-c"], load="on_demand")
    plan = _plan(_changed())
    plan.models = [lazy]
    result = _apply(sup, plan)
    assert result.ok and "worker-c" in result.started
    assert ("spawn", "worker-c") not in world.events  # listed, not loaded
    assert sup.slots["worker-c"].record.state == ServiceState.UNLOADED
    assert [row.name for row in sup.lifecycle.rows] == ["c"] and sup.lifecycle.rows[0].state == "unloaded"
    world.events.clear()
    changed = _changed()
    changed[3] = _spec("worker-c", "workers", "--port", "13", "--seed", "3", models=["c"])
    plan = _plan(changed)
    plan.models = [lazy]
    result = _apply(sup, plan)
    assert result.ok and world.events == []  # its next load uses the new settings
    assert "--seed" in sup.slots["worker-c"].spec.argv
