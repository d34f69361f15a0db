"""The supervisor's side of `llmstack up` on a running stack: apply a new plan, touching nothing that did not change.

On SIGHUP with a request in the run directory (`reconcile.ReconcileRequest`), the supervisor's loop calls
`apply_pending`, which, in this order:

1. stops the services that were removed, drained in stop tiers as `down` drains them;
2. tier by tier in start order, restarts the changed ones and starts the new ones: a changed service is drained
   first (SIGTERM: a worker leaves the controller and finishes its streams, up to drain_timeout), then started
   with its new settings, together with the tier's new services, all gated on health; replicas of one model
   restart one at a time, so the model stays served;
3. when the API server kept running, waits until it routes every model of the new plan.

Services left alone keep their processes. While it waits on health it keeps supervising the others (`tick`).
A service that fails its gate is stopped and marked failed, the rest of the stack keeps running, and the result
(`reconcile.ReconcileResult`, in the run directory) says which and why, for `up` to report.
"""

from __future__ import annotations

import collections

from llmstack.stack.children import STOP_TIERS, _ChildStop, describe_exit, stop_tiers
from llmstack.stack.plan import Plan, ServiceSpec
from llmstack.stack.reconcile import Action, ReconcileRequest, ReconcileResult, diff_plans, request_path, result_path
from llmstack.stack.rundir import ServiceRecord, ServiceState
from llmstack.stack.supervisor import START_ORDER, Supervisor, _Slot


def apply_pending(sup: Supervisor) -> None:
    """Read (and delete) the pending request, apply it, and leave the result where `up` waits for it."""
    rd = sup.run_dir
    path = request_path(rd)
    try:
        request = ReconcileRequest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        sup.event(f"unreadable request to apply stack.toml: {exc}", "ERROR")
        return
    finally:
        path.unlink(missing_ok=True)
    result = ReconcileResult(id=request.id)
    rd.write_json(result_path(rd), result.model_dump())  # under way
    try:
        secrets = {**sup.secrets, **request.secrets} if request.merge_secrets else request.secrets
        apply_plan(sup, request.plan, secrets, result)
    except Exception as exc:  # the supervisor must outlive a bug here: the stack keeps running
        result.message = f"{type(exc).__name__}: {exc}"
        sup.event(f"applying stack.toml failed: {result.message}", "ERROR")
    result.done = True
    sup.save()
    rd.write_json(result_path(rd), result.model_dump())


def apply_plan(sup: Supervisor, plan: Plan, secrets: dict[str, str], result: ReconcileResult) -> None:
    failed = {r.name for r in sup.state.services if r.state == ServiceState.FAILED}
    diff = diff_plans(sup.plan, plan, failed)
    if diff.blockers:
        result.message = "; ".join(diff.blockers)
        return
    sup.event(f"applying stack.toml: {diff.summary()}")
    sup.secrets = dict(secrets)
    sup.policy = plan.policy
    specs = {s.name: s for s in plan.services}
    removed = [sup.slots[n] for n in diff.named(Action.STOP)]
    _drain(sup, removed, "removed from stack.toml")
    for slot in removed:
        del sup.slots[slot.spec.name]
    result.stopped = [s.spec.name for s in removed]
    for name in diff.named(Action.KEEP):
        _set_spec(sup.slots[name], specs[name])  # e.g. the API server's expected models
    restart, start = diff.named(Action.RESTART), set(diff.named(Action.START))  # restart: in plan order
    # workers of models that load at run time: new ones wait for their first load; changed ones that are not
    # loaded just take their new settings (their next load uses them)
    lazy = {n for m in plan.models if m.load != "always" for n in m.services}
    for name in [n for n in start if n in lazy]:
        _new_slot(sup, specs[name]).record.state = ServiceState.UNLOADED
        start.discard(name)
        result.started.append(name)
    for name in [n for n in restart if n in lazy and sup.slots[n].child is None]:
        _set_spec(sup.slots[name], specs[name])
        restart.remove(name)
        result.restarted.append(name)
    for role in START_ORDER:
        new = [_new_slot(sup, specs[n]) for n in specs if n in start and specs[n].role == role]
        waves = _waves([sup.slots[n] for n in restart if sup.slots[n].spec.role == role]) or [[]]
        for i, wave in enumerate(waves):  # the new ones start with the first wave: one load time, not two
            _drain(sup, wave, "settings changed")
            fresh = [(slot, slot.spec) for slot in new] if i == 0 else []
            _launch(sup, [(slot, specs[slot.spec.name]) for slot in wave] + fresh, result)
            result.restarted += [s.spec.name for s in wave]
        result.started += [s.spec.name for s in new]
    _await_routes(sup, set(restart) | start, result)
    order = [s.name for s in plan.services]
    sup.slots = {n: sup.slots[n] for n in order}
    sup.state.services = [sup.slots[n].record for n in order]
    sup.plan = plan
    sup.lifecycle.replan(plan)
    sup.state.api_url, sup.state.controller_url = plan.api_url, plan.controller_url
    sup.run_dir.write_json(sup.run_dir.plan_path, plan.model_dump())
    sup.save()
    failures = f"; {len(result.failed)} failed: {', '.join(result.failed)}" if result.failed else ""
    sup.event(f"stack.toml applied: {diff.summary()}{failures}")


def _waves(slots: list[_Slot]) -> list[list[_Slot]]:
    """Restart groups: every changed service at once, except replicas of the same model, one per group."""
    by_model: dict[tuple[str, ...], list[_Slot]] = collections.defaultdict(list)
    for slot in slots:
        by_model[tuple(slot.spec.models) or (slot.spec.name,)].append(slot)
    depth = max((len(group) for group in by_model.values()), default=0)
    return [[group[i] for group in by_model.values() if i < len(group)] for i in range(depth)]


def _set_spec(slot: _Slot, spec: ServiceSpec) -> None:
    slot.spec = spec
    rec = slot.record
    rec.host, rec.port, rec.url, rec.health_url = spec.host, spec.port, spec.url, spec.health_url
    rec.models = spec.models


def _new_slot(sup: Supervisor, spec: ServiceSpec) -> _Slot:
    log_path = sup.run_dir.log_path(spec.name)
    record = ServiceRecord(
        name=spec.name, role=spec.role, host=spec.host, port=spec.port, url=spec.url, health_url=spec.health_url,
        log_path=str(log_path), models=spec.models,
    )  # fmt: skip
    slot = _Slot(spec, record)
    sup.slots[spec.name] = slot
    sup.state.services.append(record)
    follower = getattr(sup.echo, "follower", None)  # a foreground `up` shows the new service's lines too
    if follower is not None:
        follower.add(spec.name, log_path)
    return slot


def _drain(sup: Supervisor, slots: list[_Slot], why: str) -> None:
    """Stop these services as `down` does (SIGTERM, drain up to drain_timeout, then kill), in stop tiers."""
    live = [s for s in slots if s.child is not None]
    if not live:
        return
    for slot in live:
        sup.event(f"stopping {slot.spec.name} ({why}; draining for up to {sup.policy.drain_timeout:g}s)")
        slot.record.state = ServiceState.STOPPING
    sup.save()
    tiers = [[_ChildStop(s.spec.name, s.child) for s in live if s.spec.role in tier and s.child] for tier in STOP_TIERS]
    killed = lambda n: sup.event(f"{n} did not drain in time; killed")  # noqa: E731
    stop_tiers(tiers, sup.policy.drain_timeout, sup.clock, on_kill=killed)
    for slot in live:
        assert slot.child is not None
        slot.record.last_exit = slot.child.poll()
        slot.child = None
        slot.record.state = ServiceState.STOPPED
        slot.record.proc = None
    sup.save()


def _launch(sup: Supervisor, pairs: list[tuple[_Slot, ServiceSpec]], result: ReconcileResult) -> None:
    """Spawn each service with its (new) spec and wait for all of them to be healthy."""
    if not pairs:
        return
    for slot, spec in pairs:
        _set_spec(slot, spec)
        slot.crashes.clear()
        slot.restart_at = None
        slot.first_spawn = None
        slot.record.state = ServiceState.STARTING
        slot.record.message = None
        sup.event(f"starting {spec.name} on {spec.url}")
        sup._spawn(slot)
    sup.save()
    result.failed.update(_await_healthy(sup, [slot for slot, _ in pairs]))


def _await_healthy(sup: Supervisor, slots: list[_Slot]) -> dict[str, str]:
    """Wait for each to pass its health check; those that exit or time out are stopped and marked failed."""
    deadline = sup.clock.now() + sup.policy.start_timeout
    pending = {s.spec.name: s for s in slots}
    failures: dict[str, str] = {}
    while pending:
        for name, slot in list(pending.items()):
            assert slot.child is not None
            code = slot.child.poll()
            if code is not None:
                failures[name] = f"exited with {describe_exit(code)} before it was healthy"
            elif sup.stop_requested:
                failures[name] = "interrupted (the stack is stopping)"
            elif sup.clock.now() > deadline:
                failures[name] = f"not healthy after {sup.policy.start_timeout:g}s (see [stack] start_timeout)"
            elif sup.health(slot.spec):
                sup._ready(slot)
                sup.event(f"{name} healthy after {sup.clock.now() - (slot.first_spawn or sup.clock.now()):.1f}s")
                del pending[name]
                continue
            else:
                continue
            del pending[name]
            _give_up(sup, slot, failures[name])
            failures[name] += f"; last lines of {sup.run_dir.log_path(name)}:\n{sup.log_tail(name)}"
        sup.save()
        if pending:
            sup.tick()  # the rest of the stack stays supervised meanwhile
            sup._pump()
            sup.clock.sleep(sup.policy.poll_interval)
    return failures


def _give_up(sup: Supervisor, slot: _Slot, why: str) -> None:
    if slot.child is not None:
        slot.child.kill()
        slot.record.last_exit = slot.child.poll()
        slot.child = None
    slot.record.state = ServiceState.FAILED
    slot.record.message = why
    sup.event(f"{slot.spec.name} {why}", "ERROR")


def _await_routes(sup: Supervisor, touched: set[str], result: ReconcileResult) -> None:
    """An API server that kept running is ready for the new plan once it routes every model of it."""
    api = next((s for s in sup.slots.values() if s.spec.role == "api"), None)
    if api is None or api.spec.name in touched or api.record.state != ServiceState.RUNNING or not touched:
        return
    broken = {m for n in result.failed if n in sup.slots for m in sup.slots[n].spec.models}
    gate = api.spec.model_copy(update={"expect_models": [m for m in api.spec.expect_models if m not in broken]})
    deadline = sup.clock.now() + sup.policy.start_timeout
    while not sup.health(gate):
        if sup.stop_requested or sup.clock.now() > deadline:
            models = ", ".join(gate.expect_models)
            result.failed[api.spec.name] = f"does not route every model ({models}) after {sup.policy.start_timeout:g}s"
            return
        sup.tick()
        sup._pump()
        sup.clock.sleep(sup.policy.poll_interval)
