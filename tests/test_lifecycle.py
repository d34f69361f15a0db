"""Models at run time inside the supervisor, with the fake clock, processes and health of the supervisor's
own tests: on-demand loads (one worker for many demands), keep-alive, the memory budget's evictions (LRU,
never busy or pinned ones), refusals with figures, and load failures with their cause. The end-to-end
version with real processes is tests/test_models_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.common.errors import NotFound
from llmstack.stack.budget import Budget, Busy, Fits, Holder, Never, plan_load, start_problems
from llmstack.stack.lifecycle import InsufficientMemory, LoadState, ModelLoadFailed, NotLoaded
from llmstack.stack.plan import ModelPlan, Plan, Policy, ServiceSpec
from llmstack.stack.rundir import RunDir, ServiceState
from llmstack.stack.supervisor import Supervisor
from llmstack.stack.units import parse_duration, parse_size
from tests.test_supervisor import FakeClock, World

MiB = 2**20


def _spec(name: str, role: str) -> ServiceSpec:
    return ServiceSpec(name=name, role=role, argv=["x"], host="127.0.0.1", port=1, url="u", health_url="h")  # type: ignore[arg-type]


def _sup(world: World, tmp_path: Path, models: list[ModelPlan], budget: int | None = None) -> Supervisor:
    services = [_spec("controller", "controller"), *(_spec(f"w-{m.name}", "workers") for m in models)]
    plan = Plan(
        stack="t",
        run_id="r1",
        policy=Policy(poll_interval=0.1, drain_timeout=5.0, start_timeout=60.0),
        services=services,
        models=models,
        memory_budget=budget,
    )
    sup = Supervisor(plan, RunDir(tmp_path / "run"), factory=world.factory, clock=world.clock, health=world.health)
    sup.lifecycle.probe = lambda slot: busy.get(slot.spec.name, {"queue_length": 0, "served": 0})
    busy: dict[str, dict] = {}
    sup.busy = busy  # type: ignore[attr-defined]
    return sup


def _model(name: str, **kw: object) -> ModelPlan:
    return ModelPlan(name=name, names=[name], services=[f"w-{name}"], **kw)  # type: ignore[arg-type]


def _run(sup: Supervisor, world: World, seconds: float) -> None:
    end = world.clock.now() + seconds
    while world.clock.now() < end:
        sup.tick()
        world.clock.sleep(0.1)


@pytest.fixture
def world() -> World:
    return World(FakeClock())


def test_on_demand_workers_wait_and_many_demands_start_one(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path, [_model("a", load="on_demand"), _model("b")])
    assert sup.start()
    assert world.spawns == {"controller": 1, "w-b": 1}  # a is not started
    assert sup.state.service("w-a").state == ServiceState.UNLOADED
    futures = [sup.lifecycle.submit("demand", "a", 30) for _ in range(8)]
    _run(sup, world, 2)
    assert world.spawns["w-a"] == 1
    rows = [f.result(0) for f in futures]
    assert {r.state for r in rows} == {LoadState.LOADED} and rows[0].load_seconds == pytest.approx(0.5, abs=0.21)
    unknown = sup.lifecycle.submit("load", "nope")
    sup.tick()
    with pytest.raises(NotFound, match=r"'nope' is not in this stack \(models: a, b\)"):
        unknown.result(0)


def test_keep_alive_unloads_an_idle_model_and_a_request_loads_it_again(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path, [_model("a", load="on_demand", keep_alive=3.0)])
    assert sup.start()
    sup.lifecycle.submit("demand", "a", 30)
    _run(sup, world, 1)
    assert sup.lifecycle.models["a"].state == LoadState.LOADED
    sup.busy["w-a"] = {"queue_length": 1, "served": 0}  # a long request: not idle
    _run(sup, world, 5)
    assert sup.lifecycle.models["a"].state == LoadState.LOADED
    sup.busy["w-a"] = {"queue_length": 0, "served": 1}  # it ended; idle from now on
    _run(sup, world, 2)
    assert sup.lifecycle.models["a"].state == LoadState.LOADED
    _run(sup, world, 2)
    assert sup.lifecycle.models["a"].state == LoadState.UNLOADED
    assert ("terminate", "w-a") in world.events
    future = sup.lifecycle.submit("demand", "a", 30)
    _run(sup, world, 1)
    assert future.result(0).state == LoadState.LOADED and world.spawns["w-a"] == 2


def test_budget_evicts_the_least_recently_used_idle_unpinned_model(world: World, tmp_path: Path) -> None:
    models = [_model(n, load="on_demand", memory_bytes=400 * MiB, pin=(n == "p")) for n in ("p", "a", "b", "c")]
    sup = _sup(world, tmp_path, models, budget=1000 * MiB)  # two of them fit
    assert sup.start()
    life = sup.lifecycle

    def use(name: str) -> None:
        future = life.submit("demand", name, 60)
        _run(sup, world, 2)
        assert future.result(0).state == LoadState.LOADED
        assert sum(m.state != LoadState.UNLOADED for m in life.models.values()) <= 2

    use("a")
    use("b")
    use("c")  # a is the least recently used
    use("a")  # now b is
    assert [e.model for e in life.events if e.action == "evict"] == ["a", "b"]
    # c is the least recently used but has a request in flight: a goes instead
    sup.busy["w-c"] = {"queue_length": 1, "served": 0}
    _run(sup, world, 1)
    use("b")
    assert [e.model for e in life.events if e.action == "evict"] == ["a", "b", "a"]
    sup.busy["w-c"] = {"queue_length": 0, "served": 1}
    _run(sup, world, 1)
    use("p")  # c's request ended after b was last used: b is the least recently used
    evicted = [e.model for e in life.events if e.action == "evict"]
    assert evicted[-1] == "b"
    use("a")  # p is the least recently used now, but pinned: c goes
    assert [e.model for e in life.events if e.action == "evict"][-1] == "c"
    assert life.models["p"].state == LoadState.LOADED


def test_a_load_waits_for_memory_held_by_a_busy_model(world: World, tmp_path: Path) -> None:
    models = [_model(n, load="on_demand", memory_bytes=600 * MiB) for n in ("a", "b")]
    sup = _sup(world, tmp_path, models, budget=1000 * MiB)
    assert sup.start()
    sup.lifecycle.submit("demand", "a", 60)
    _run(sup, world, 1)
    sup.busy["w-a"] = {"queue_length": 1, "served": 0}
    _run(sup, world, 1)
    future = sup.lifecycle.submit("demand", "b", 60)
    _run(sup, world, 3)
    assert not future.done() and "waiting for memory" in (sup.lifecycle.models["b"].message or "")
    assert sup.lifecycle.models["a"].state == LoadState.LOADED
    sup.busy["w-a"] = {"queue_length": 0, "served": 1}
    _run(sup, world, 2)
    assert future.result(0).state == LoadState.LOADED and sup.lifecycle.models["a"].state == LoadState.UNLOADED


def test_refusals_name_the_figures(world: World, tmp_path: Path) -> None:
    models = [_model("big", load="on_demand", memory_bytes=2048 * MiB), _model("m", load="manual")]
    sup = _sup(world, tmp_path, models, budget=1024 * MiB)
    assert sup.start()
    future = sup.lifecycle.submit("load", "big", 60)
    sup.tick()
    with pytest.raises(
        InsufficientMemory, match=r"cannot fit even alone: it needs 2.00 GiB but .*memory_budget is 1.00 GiB"
    ):
        future.result(0)
    future = sup.lifecycle.submit("demand", "m", 60)
    sup.tick()
    with pytest.raises(NotLoaded, match="llmstack models load m"):
        future.result(0)
    assert "w-big" not in world.spawns


def test_a_failed_load_answers_with_the_cause(world: World, tmp_path: Path) -> None:
    sup = _sup(world, tmp_path, [_model("a", load="on_demand")])
    assert sup.start()
    world.die_on_start.add("w-a")
    future = sup.lifecycle.submit("demand", "a", 60)
    _run(sup, world, 1)
    with pytest.raises(
        ModelLoadFailed, match=r"failed to load: worker w-a exited with exit code 1; its log ends: .*hello"
    ):
        future.result(0)
    assert sup.lifecycle.models["a"].state == LoadState.FAILED


def test_budget_arithmetic() -> None:
    b = Budget(host_bytes=1000)
    idle = [Holder("x", 400, last_used=1), Holder("y", 400, last_used=2)]
    assert plan_load("z", 100, {}, idle, b) == Fits([])
    assert plan_load("z", 400, {}, idle, b) == Fits(["x"])
    assert plan_load("z", 900, {}, idle, b) == Fits(["x", "y"])
    assert isinstance(plan_load("z", 1001, {}, [], b), Never)
    kept = [Holder("x", 400, last_used=1, pinned=True), Holder("y", 400, last_used=2, inflight=2)]
    busy = plan_load("z", 400, {}, kept, b)
    assert isinstance(busy, Busy) and "x 0 KiB (pinned)" in busy.message
    assert "2 request(s) in flight" in busy.message
    gpu = Budget(gpu_bytes=100)
    assert plan_load("g", 10, {"0": 60}, [Holder("h", 10, {"0": 50}), Holder("k", 10, {"1": 90})], gpu) == Fits(["h"])
    assert start_problems([("a", 600), ("b", 600)], b) and not start_problems([("a", 600)], b)


def test_units() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25 and parse_duration(3) == 3.0
    assert (
        parse_size("12GiB") == 12 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("1.5G") == 1.5 * 2**30
    )
    for bad in ("10x", "", "m5"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("twelve")


def test_config_keys_for_models_at_run_time() -> None:
    from llmstack.stack.config import ConfigError, parse_config

    cfg = parse_config(
        {
            "stack": {"memory_budget": "12GiB", "admin_key_env": "MY_ADMIN_KEY"},
            "models": [{"model": "x", "load": "on_demand", "keep_alive": "10m", "pin": True, "memory": "1.5GiB"}],
            "api": {"load_wait": "2m"},
        }
    )
    m = cfg.models[0]
    assert (m.load, m.keep_alive, m.pin, m.memory) == ("on_demand", 600.0, True, int(1.5 * 2**30))
    assert cfg.stack.memory_budget == 12 * 2**30 and cfg.api.load_wait == 120.0
    assert "--load-wait" in cfg.api.args("http://c")
    with pytest.raises(ConfigError, match=r"models\[0\].*keep_alive applies to load"):
        parse_config({"models": [{"model": "x", "keep_alive": "10m"}]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.load"):
        parse_config({"models": [{"model": "x", "load": "lazy"}]})
    with pytest.raises(ConfigError, match=r"stack\.memory_budget: .*'lots' is not a size"):
        parse_config({"stack": {"memory_budget": "lots"}})


def test_the_estimate_follows_the_weights_and_the_load_dtype(tiny_model_dir: Path) -> None:
    from llmstack.stack.config import ModelSection
    from llmstack.stack.footprint import RUNTIME_BYTES, estimate, weight_files

    on_disk = sum(f.stat().st_size for f in weight_files(tiny_model_dir))
    fp32 = estimate(tiny_model_dir, ModelSection(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    bf16 = estimate(tiny_model_dir, ModelSection(model=str(tiny_model_dir), device="cpu", dtype="bfloat16"))
    int8 = estimate(tiny_model_dir, ModelSection(model=str(tiny_model_dir), device="cpu", load_8bit=True))
    assert fp32.host_bytes > bf16.host_bytes > int8.host_bytes > RUNTIME_BYTES
    assert fp32.host_bytes - RUNTIME_BYTES >= on_disk  # float32 is as wide as anything on disk
    gpu = estimate(tiny_model_dir, ModelSection(model=str(tiny_model_dir), device="cuda", gpus="0,1"))
    assert set(gpu.gpu_bytes) == {"0", "1"} and gpu.host_bytes == RUNTIME_BYTES


def test_the_admin_key_is_generated_once_and_never_a_v1_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmstack.stack.admin import AdminKeyError, admin_key, admin_key_of_env

    key = admin_key(tmp_path, None, {})
    assert admin_key(tmp_path, None, {}) == key and oct((tmp_path / "admin_key").stat().st_mode & 0o777) == "0o600"
    assert admin_key(tmp_path, "K", {"K": "from-env"}) == "from-env"
    with pytest.raises(AdminKeyError, match=r"\$K is not set"):
        admin_key(tmp_path, "K", {})
    monkeypatch.setenv("K", "sk-public")
    with pytest.raises(AdminKeyError, match="also one of the /v1 API keys"):
        admin_key_of_env("K", {"LLMSTACK_API_KEYS": "sk-public,sk-other"})
    admin_key_of_env("K", {"LLMSTACK_API_KEYS": "sk-other"})
