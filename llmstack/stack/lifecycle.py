"""Models at run time, inside the supervisor: each `[[models]]` entry is unloaded, loading, loaded,
unloading or failed, and moves between those states on request and by rule.

- Requests: `llmstack models load/unload` (through the admin API, `stack/admin.py`) and the API server's
  "demand" when a request names an on-demand model that is not loaded. Concurrent demands join the one load.
- Rules: `keep_alive` unloads a model idle that long; the memory budget (`stack/budget.py`) unloads the least
  recently used idle, unpinned models first to make room, and refuses, with the figures, a model that cannot
  fit even alone. A load that needs memory held by busy or pinned models waits until it is freed (or its
  requester gives up).
- Figures: the footprint is the declared `memory`, else the measured resident memory of the worker's process
  tree once loaded, else the estimate from the weights (`stack/footprint.py`). In-flight requests and last use
  come from each loaded worker's `/health` (queue length, requests served).

Everything here runs in the supervisor's one thread (`tick()`); the admin API's threads only `submit()`
commands and read the latest `rows` snapshot, so no lock guards the state itself.
"""

from __future__ import annotations

import collections
import enum
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import httpx
from pydantic import BaseModel

from llmstack.common.errors import LLMStackError, NotFound, ServiceUnavailable
from llmstack.stack.budget import Budget, Busy, Fits, Holder, Never, plan_load
from llmstack.stack.children import describe_exit
from llmstack.stack.plan import ModelPlan, Plan
from llmstack.stack.rundir import ServiceState

if TYPE_CHECKING:
    from llmstack.stack.admin import AdminServer
    from llmstack.stack.supervisor import Supervisor, _Slot

POLL_EVERY = 0.5  # seconds between looks at the loaded workers' /health
RETRY_AFTER = 5.0  # a model whose load failed this recently answers with that failure instead of retrying
LOG_CAUSE_LINES = 3


class LoadState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelLoadFailed(ServiceUnavailable):
    code = "model_load_failed"


class InsufficientMemory(ServiceUnavailable):
    code = "insufficient_memory"


class NotLoaded(ServiceUnavailable):
    code = "model_not_loaded"


class ModelRow(BaseModel):
    """One model as `llmstack models` and the admin API show it."""

    name: str
    names: list[str]
    load: str
    state: LoadState
    pinned: bool
    keep_alive_s: float | None
    services: list[str]
    memory_bytes: int = 0  # what the budget counts for it
    memory_source: Literal["declared", "measured", "estimated", "unknown"] = "unknown"
    estimate_bytes: int | None = None
    rss_bytes: int | None = None
    last_used: float | None = None  # wall clock
    loaded_at: float | None = None
    load_seconds: float | None = None  # how long its last load took
    inflight: int = 0
    message: str | None = None


class LifecycleEvent(BaseModel):
    at: float  # wall clock
    model: str
    action: Literal["load", "loaded", "unload", "unloaded", "evict", "failed", "refused"]
    reason: str = ""


Op = Literal["load", "demand", "unload"]


@dataclass
class _Command:
    op: Op
    name: str
    wait_s: float | None
    future: Future[ModelRow]


@dataclass
class _Model:
    plan: ModelPlan
    state: LoadState = LoadState.UNLOADED
    message: str | None = None
    spawned: bool = False  # LOADING: its workers run (else it waits for memory)
    last_used: float = 0.0
    loaded_at: float | None = None
    load_started: float | None = None  # monotonic
    load_seconds: float | None = None
    wait_until: float | None = None  # monotonic: a waiting load fails after this
    stop_deadline: float | None = None
    failed_at: float | None = None
    rss: int | None = None
    inflight: int = 0
    served: dict[str, int] = field(default_factory=dict)
    waiters: list[Future[ModelRow]] = field(default_factory=list)
    unload_waiters: list[Future[ModelRow]] = field(default_factory=list)

    @property
    def pinned(self) -> bool:
        return self.plan.pin or self.plan.load == "always"


class Lifecycle:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        plan = sup.plan
        self.budget = Budget(plan.memory_budget, plan.gpu_memory_budget)
        self.models: dict[str, _Model] = {m.name: _Model(m) for m in plan.models}
        self.by_alias = {alias: m for m in self.models.values() for alias in m.plan.names}
        self.commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self.events: collections.deque[LifecycleEvent] = collections.deque(maxlen=500)
        self.rows: list[ModelRow] = []
        self.client = httpx.Client(timeout=2.0, trust_env=False, verify=False)
        self._next_poll = 0.0
        self._written: str | None = None
        self.admin: AdminServer | None = None
        self.probe: Callable[[_Slot], dict | None] = self._health_body  # a worker's /health body (injectable)
        for m in self.models.values():
            if m.plan.load == "always":
                m.state, m.spawned = LoadState.LOADING, True
            else:
                for slot in self._slots(m):
                    slot.record.state = ServiceState.UNLOADED
        self.snapshot()

    # -- for the supervisor -------------------------------------------------------------------------------
    def deferred(self, service: str) -> bool:
        """Whether `start()` leaves this worker service alone (its model loads later)."""
        return any(service in m.plan.services and m.plan.load != "always" for m in self.models.values())

    def started(self) -> None:
        """The stack is up: the models loaded at start are loaded."""
        now = self.sup.clock.wall()
        for m in self.models.values():
            if m.plan.load == "always":
                m.state, m.loaded_at, m.last_used = LoadState.LOADED, now, now
        self.snapshot()

    def replan(self, plan: Plan) -> None:
        """A plan applied to the running stack (`reconcile_apply`): removed models are forgotten, new ones
        start in their load state (loaded at start: loaded now; else unloaded), the others keep their state
        and take their new settings."""
        self.budget = Budget(plan.memory_budget, plan.gpu_memory_budget)
        now = self.sup.clock.wall()
        models: dict[str, _Model] = {}
        for entry in plan.models:
            m = self.models.get(entry.name)
            if m is None:
                m = _Model(entry)
                if entry.load == "always":
                    m.state, m.spawned, m.loaded_at, m.last_used = LoadState.LOADED, True, now, now
            m.plan = entry
            models[entry.name] = m
        self.models = models
        self.by_alias = {alias: m for m in self.models.values() for alias in m.plan.names}
        self.snapshot()

    def submit(self, op: Op, name: str, wait_s: float | None = None) -> Future[ModelRow]:
        """From any thread: a command for the supervisor's loop; the future ends with the model's row (load,
        demand: once loaded; unload: once unloaded) or an `LLMStackError`."""
        future: Future[ModelRow] = Future()
        self.commands.put(_Command(op, name, wait_s, future))
        return future

    def tick(self) -> None:
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            self._command(cmd)
        now = self.sup.clock.now()
        if now >= self._next_poll:
            self._next_poll = now + POLL_EVERY
            self._poll_loaded()
            self._keep_alive()
        for m in self.models.values():
            if m.state == LoadState.LOADING:
                self._advance_load(m) if m.spawned else self._try_spawn(m)
            elif m.state == LoadState.UNLOADING:
                self._advance_unload(m)
            elif m.state == LoadState.LOADED:
                self._watch_loaded(m)
        self.snapshot()

    # -- commands -----------------------------------------------------------------------------------------
    def find(self, name: str) -> _Model:
        m = self.by_alias.get(name) or next((x for x in self.models.values() if x.plan.name == name), None)
        if m is None:
            known = ", ".join(sorted(self.by_alias)) or "none"
            raise NotFound(f"The model '{name}' is not in this stack (models: {known}).", param="model")
        return m

    def _command(self, cmd: _Command) -> None:
        try:
            m = self.find(cmd.name)
            if cmd.op == "unload":
                self._unload_command(m, cmd.future)
            else:
                self._load_command(m, cmd)
        except LLMStackError as exc:
            cmd.future.set_exception(exc)

    def _load_command(self, m: _Model, cmd: _Command) -> None:
        if cmd.op == "demand" and m.plan.load != "on_demand" and m.state in (LoadState.UNLOADED, LoadState.FAILED):
            raise NotLoaded(
                f"The model '{m.plan.name}' is not loaded; it loads on command: `llmstack models load {m.plan.name}`."
            )
        if m.state == LoadState.LOADED:
            if cmd.op == "demand":
                m.last_used = self.sup.clock.wall()
            cmd.future.set_result(self.row(m))
            return
        if m.state == LoadState.FAILED and m.failed_at is not None:
            if self.sup.clock.now() - m.failed_at < RETRY_AFTER:
                raise ModelLoadFailed(m.message or f"The model '{m.plan.name}' failed to load.")
        m.waiters.append(cmd.future)
        wait = cmd.wait_s if cmd.wait_s is not None else self.sup.policy.start_timeout
        until = self.sup.clock.now() + wait
        if m.state == LoadState.LOADING:
            m.wait_until = max(m.wait_until or 0.0, until)
            return
        if m.state == LoadState.UNLOADING:
            return  # loads again once its workers are gone (see _advance_unload)
        self._begin_load(m, until, "requested" if cmd.op == "load" else "a request for it")

    def _unload_command(self, m: _Model, future: Future[ModelRow]) -> None:
        if m.state in (LoadState.UNLOADED, LoadState.FAILED):
            self._set_unloaded(m)
            future.set_result(self.row(m))
            return
        m.unload_waiters.append(future)
        if m.state == LoadState.LOADING:
            self._fail_waiters(m, ServiceUnavailable(f"The load of '{m.plan.name}' was cancelled by an unload."))
        if m.state != LoadState.UNLOADING:
            self._begin_unload(m, "requested", "unload")

    # -- loading ------------------------------------------------------------------------------------------
    def _begin_load(self, m: _Model, until: float, reason: str) -> None:
        m.state, m.spawned, m.message = LoadState.LOADING, False, None
        m.wait_until, m.load_started, m.rss = until, self.sup.clock.now(), None
        self._event(m, "load", reason)
        self._try_spawn(m)

    def _try_spawn(self, m: _Model) -> None:
        """Spawn its workers once the budget allows, first unloading what must go; or fail with the figures."""
        host, gpus = self.need(m)
        # memory of models being unloaded is as good as free: plan without it, but spawn only once it is
        holders = [self.holder(x) for x in self.models.values() if x is not m and self._holds(x)]
        decision = plan_load(m.plan.name, host, gpus, holders, self.budget)
        if isinstance(decision, Never):
            self._event(m, "refused", decision.message)
            self._fail(m, InsufficientMemory(decision.message), retry=False)
            return
        if isinstance(decision, Busy):
            m.message = f"waiting for memory: {decision.message}"
            if self.sup.clock.now() > (m.wait_until or 0.0):
                self._event(m, "refused", decision.message)
                self._fail(m, InsufficientMemory(decision.message), retry=False)
            return
        assert isinstance(decision, Fits)
        if decision.evict:
            kept = [f"{h.name}: {h.why_kept()}" for h in holders if h.why_kept() and h.name not in decision.evict]
            why = f"least recently used idle model, to make room for {m.plan.name}"
            why += f" (kept: {'; '.join(kept)})" if kept else ""
            for name in decision.evict:
                victim = self.models[name]
                self._event(victim, "evict", why)
                self._begin_unload(victim, f"evicted for {m.plan.name}", "evict")
            m.message = f"waiting for {', '.join(decision.evict)} to unload"
            return
        if any(x.state == LoadState.UNLOADING for x in self.models.values() if x is not m and self._budgeted()):
            m.message = "waiting for an unload to finish"
            return
        for slot in self._slots(m):
            slot.crashes.clear()
            slot.restart_at = None
            slot.record.state = ServiceState.STARTING
            self.sup.event(f"loading {m.plan.name}: starting {slot.spec.name} on {slot.spec.url}")
            self.sup._spawn(slot)
        m.spawned, m.message = True, None
        self.sup.save()

    def _budgeted(self) -> bool:
        return self.budget.host_bytes is not None or self.budget.gpu_bytes is not None

    def _advance_load(self, m: _Model) -> None:
        slots = self._slots(m)
        for slot in slots:
            if slot.record.state == ServiceState.RUNNING:
                continue
            code = slot.child.poll() if slot.child is not None else -1
            if code is not None:
                slot.record.state, slot.record.last_exit, slot.child = ServiceState.FAILED, code, None
                cause = self._log_cause(slot.spec.name)
                message = (
                    f"The model '{m.plan.name}' failed to load: worker {slot.spec.name} exited with "
                    f"{describe_exit(code)}" + (f"; its log ends: {cause}" if cause else "")
                )
                slot.record.message = message
                self._event(m, "failed", message)
                self._stop_slots(m, kill=True)
                self._fail(m, ModelLoadFailed(message), retry=True)
                return
            if self.sup.health(slot.spec):
                self.sup._ready(slot)
                self.sup.save()
        if all(s.record.state == ServiceState.RUNNING for s in slots):
            self._loaded(m)
        elif self.sup.clock.now() - (m.load_started or 0.0) > self.sup.policy.start_timeout:
            limit = self.sup.policy.start_timeout
            message = f"The model '{m.plan.name}' did not load within [stack] start_timeout ({limit:g}s)."
            self._event(m, "failed", message)
            self._stop_slots(m, kill=True)
            self._fail(m, ModelLoadFailed(message), retry=True)

    def _loaded(self, m: _Model) -> None:
        now = self.sup.clock.wall()
        m.state, m.loaded_at, m.last_used, m.message = LoadState.LOADED, now, now, None
        m.load_seconds = round(self.sup.clock.now() - (m.load_started or self.sup.clock.now()), 3)
        m.served, m.inflight, m.wait_until = {}, 0, None
        self._measure(m)
        self._event(m, "loaded", f"in {m.load_seconds:.1f}s")
        self.snapshot()  # published before the waiters hear of it, so a listing right after agrees
        row = self.row(m)
        for future in m.waiters:
            if not future.done():
                future.set_result(row)
        m.waiters.clear()

    def _fail(self, m: _Model, error: LLMStackError, *, retry: bool) -> None:
        m.state, m.message, m.spawned = LoadState.FAILED, error.message, False
        m.failed_at = self.sup.clock.now() if retry else None
        for slot in self._slots(m):
            if slot.record.state != ServiceState.FAILED:
                slot.record.state = ServiceState.UNLOADED
        self._fail_waiters(m, error)
        self.sup.save()

    def _fail_waiters(self, m: _Model, error: LLMStackError) -> None:
        self.snapshot()
        for future in m.waiters:
            if not future.done():
                future.set_exception(error)
        m.waiters.clear()

    def _log_cause(self, service: str) -> str:
        """The lines of a failed worker's log that say why: its last error line (a traceback's exception),
        else its last lines; source quotes and caret markers are left out."""
        lines = [ln.strip() for ln in self.sup.log_tail(service, 60).splitlines()]
        lines = [ln for ln in lines if any(c.isalnum() for c in ln) and not ln.startswith("File ")]
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln.lower() or "Exception" in ln]
        picked = errors[-LOG_CAUSE_LINES:] if errors else lines[-LOG_CAUSE_LINES:]
        return " | ".join(picked)[-600:]

    # -- unloading ----------------------------------------------------------------------------------------
    def _begin_unload(self, m: _Model, reason: str, action: Literal["unload", "evict"]) -> None:
        if action == "unload":
            self._event(m, "unload", reason)
        m.state, m.message = LoadState.UNLOADING, reason
        m.stop_deadline = self.sup.clock.now() + self.sup.policy.drain_timeout
        self._stop_slots(m, kill=False)
        self.sup.save()

    def _stop_slots(self, m: _Model, *, kill: bool) -> None:
        for slot in self._slots(m):
            if slot.child is None:
                continue
            slot.record.state = ServiceState.STOPPING  # the supervisor's tick leaves it alone now
            slot.child.kill() if kill else slot.child.terminate()
            if kill:
                slot.child = None

    def _advance_unload(self, m: _Model) -> None:
        live = [s for s in self._slots(m) if s.child is not None and s.child.poll() is None]
        if live and self.sup.clock.now() < (m.stop_deadline or 0.0):
            return
        for slot in live:
            self.sup.event(f"{slot.spec.name} did not drain in time; killed", "WARNING")
            slot.child.kill()  # type: ignore[union-attr]
        self._set_unloaded(m)
        self._event(m, "unloaded", "")
        self.snapshot()
        row = self.row(m)
        for future in m.unload_waiters:
            if not future.done():
                future.set_result(row)
        m.unload_waiters.clear()
        if m.waiters:  # asked for again while it was unloading
            self._begin_load(m, m.wait_until or self.sup.clock.now() + self.sup.policy.start_timeout, "requested again")

    def _set_unloaded(self, m: _Model) -> None:
        for slot in self._slots(m):
            if slot.child is not None:
                slot.record.last_exit = slot.child.poll()
            slot.child, slot.restart_at = None, None
            slot.record.state = ServiceState.UNLOADED
        m.state, m.message, m.spawned, m.rss, m.inflight = LoadState.UNLOADED, None, False, None, 0
        m.loaded_at = None
        self.sup.save()

    # -- watching the loaded ones -------------------------------------------------------------------------
    def _watch_loaded(self, m: _Model) -> None:
        """A loaded model whose worker gave up (crash loop) has failed."""
        failed = [s for s in self._slots(m) if s.record.state == ServiceState.FAILED]
        if failed:
            m.state, m.message, m.failed_at = LoadState.FAILED, failed[0].record.message, self.sup.clock.now()

    def _poll_loaded(self) -> None:
        for m in self.models.values():
            if m.state != LoadState.LOADED:
                continue
            inflight, changed = 0, False
            for slot in self._slots(m):
                if slot.record.state != ServiceState.RUNNING:
                    continue
                body = self.probe(slot)
                if body is None:
                    continue
                inflight += int(body.get("queue_length") or 0)
                served = int(body.get("served") or 0)
                changed |= m.served.get(slot.spec.name, 0) != served
                m.served[slot.spec.name] = served
            m.inflight = inflight
            if changed:  # a request finished since the last look
                m.last_used = self.sup.clock.wall()
            self._measure(m)

    def _health_body(self, slot: _Slot) -> dict | None:
        try:
            resp = self.client.get(slot.spec.health_url)
            body = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def _measure(self, m: _Model) -> None:
        total = 0
        for slot in self._slots(m):
            ref = slot.record.proc
            if ref is None or slot.child is None:
                continue
            for proc in ref.members():
                try:
                    total += proc.memory_info().rss
                except Exception:  # noqa: BLE001 (it exited meanwhile)
                    continue
        if total:
            m.rss = max(m.rss or 0, total)

    def _keep_alive(self) -> None:
        now = self.sup.clock.wall()
        for m in self.models.values():
            ttl = m.plan.keep_alive
            if m.state != LoadState.LOADED or ttl is None or m.plan.pin or m.inflight:
                continue
            if now - m.last_used >= ttl:
                self._begin_unload(m, f"idle for {now - m.last_used:.0f}s (keep_alive {ttl:g}s)", "unload")

    def confirm_idle(self, m: _Model) -> bool:
        """A fresh look before evicting: no request in flight on any of its workers."""
        for slot in self._slots(m):
            body = self.probe(slot)
            if body is not None and int(body.get("queue_length") or 0):
                m.inflight = int(body["queue_length"])
                return False
        return True

    # -- figures ------------------------------------------------------------------------------------------
    def need(self, m: _Model) -> tuple[int, dict[str, int]]:
        """What the budget counts for it: declared, else measured (once loaded), else estimated."""
        est = m.plan.estimate
        gpus = dict(est.gpu_bytes) if est is not None else {}
        if m.plan.memory_bytes is not None:
            return m.plan.memory_bytes, gpus
        if m.rss:
            return m.rss, gpus
        return (est.host_bytes if est is not None else 0), gpus

    def _source(self, m: _Model) -> Literal["declared", "measured", "estimated", "unknown"]:
        if m.plan.memory_bytes is not None:
            return "declared"
        if m.rss:
            return "measured"
        return "estimated" if m.plan.estimate is not None else "unknown"

    def _holds(self, m: _Model) -> bool:
        return m.state == LoadState.LOADED or (m.state == LoadState.LOADING and m.spawned)

    def holder(self, m: _Model) -> Holder:
        host, gpus = self.need(m)
        settled = m.state == LoadState.LOADED
        if settled and not m.pinned and not m.inflight and self._budgeted():
            settled = self.confirm_idle(m)  # cheap: only while a load is being planned
        return Holder(m.plan.name, host, gpus, m.last_used, m.inflight, m.pinned, settled)

    def row(self, m: _Model) -> ModelRow:
        host, _ = self.need(m)
        return ModelRow(
            name=m.plan.name,
            names=m.plan.names,
            load=m.plan.load,
            state=m.state,
            pinned=m.plan.pin,
            keep_alive_s=m.plan.keep_alive,
            services=m.plan.services,
            memory_bytes=host,
            memory_source=self._source(m),
            estimate_bytes=m.plan.estimate.host_bytes if m.plan.estimate is not None else None,
            rss_bytes=m.rss,
            last_used=m.last_used or None,
            loaded_at=m.loaded_at,
            load_seconds=m.load_seconds,
            inflight=m.inflight,
            message=m.message,
        )

    def snapshot(self) -> None:
        """Publish the rows (for the admin API's threads) and write them to the run directory (for status)."""
        self.rows = [self.row(m) for m in self.models.values()]
        text = "[" + ",".join(r.model_dump_json() for r in self.rows) + "]"
        if text != self._written:
            self._written = text
            self.sup.run_dir.write_json(self.sup.run_dir.root / "models.json", [r.model_dump() for r in self.rows])

    def _event(self, m: _Model, action: str, reason: str) -> None:
        self.events.append(LifecycleEvent(at=time.time(), model=m.plan.name, action=action, reason=reason))  # type: ignore[arg-type]
        self.sup.event(f"model {m.plan.name}: {action}" + (f" ({reason})" if reason else ""))

    def _slots(self, m: _Model) -> list[_Slot]:
        return [self.sup.slots[name] for name in m.plan.services if name in self.sup.slots]

    def open(self) -> None:
        """Serve the admin API (for `llmstack models` and the API server's demands)."""
        from llmstack.stack.admin import serve_admin

        self.admin = serve_admin(self.sup)

    def close(self) -> None:
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
            (self.sup.run_dir.root / "admin.json").unlink(missing_ok=True)
        self.client.close()
