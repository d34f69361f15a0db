"""Process supervision for `llmstack up`: spawn, gate on health, restart with backoff, stop cleanly.

One loop in one thread owns every child (as honcho does): it polls exits, health endpoints and the
restart schedule, and writes the run state after every change, so other shells see what it sees.

- Start order: Ray node -> controller -> workers (spawned together, gated together) -> api -> webui. Any exit or
  timeout while starting aborts the whole start: what was started is stopped, and the cause is reported
  with the tail of that service's log.
- After start, a child that exits is restarted after ``restart_backoff * 2**(crashes-1)`` seconds (capped).
  More than ``crash_loop_restarts`` crashes within ``crash_loop_window`` seconds is a crash loop: the
  service is marked failed, with its last log lines, and left alone.
- Stop: in tiers (webui+api, then workers, then controller, then the Ray node), SIGTERM to each leader so uvicorn drains
  in-flight requests, then SIGKILL to whatever is left of each process tree when the deadline passes.
- SIGHUP with a new plan in the run directory (`llmstack up` on a running stack): `reconcile_apply.py`
  applies it between ticks; without one, SIGHUP stops like SIGTERM.

Children run in their own session (process group) and write straight to their log file, so neither a
Ctrl-C in the terminal nor the death of the supervisor takes them down uncontrolled. The process
factory, the clock and the health check are parameters, so the loop is unit-testable without processes.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

import psutil

from llmstack.stack.children import (
    STOP_TIERS,
    Child,
    Clock,
    HealthCheck,
    HTTPHealth,
    ProcessFactory,
    Stoppable,
    SystemClock,
    _ChildStop,
    describe_exit,
    spawn_process,
    stop_tiers,
)
from llmstack.stack.lifecycle import Lifecycle
from llmstack.stack.logs import tail_file
from llmstack.stack.plan import SECRET_ENV, Plan, ServiceSpec
from llmstack.stack.rundir import RUN_ID_ENV, Phase, ProcRef, Role, RunDir, RunState, ServiceRecord, ServiceState

START_ORDER: tuple[Role, ...] = ("ray", "controller", "workers", "api", "webui")


LOG_TAIL_LINES = 20


class StartFailed(Exception):
    """A service did not come up; the message names it and quotes its log."""


@dataclass
class _Slot:
    spec: ServiceSpec
    record: ServiceRecord
    child: Child | None = None
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    restart_at: float | None = None
    first_spawn: float | None = None  # monotonic


class Supervisor:
    def __init__(
        self,
        plan: Plan,
        run_dir: RunDir,
        *,
        factory: ProcessFactory = spawn_process,
        clock: Clock | None = None,
        health: HealthCheck | None = None,
        secrets: dict[str, str] | None = None,
        echo: Callable[[str, str], None] | None = None,
        base_env: dict[str, str] | None = None,
    ) -> None:
        self.plan = plan
        self.policy = plan.policy
        self.run_dir = run_dir
        self.factory = factory
        self.clock = clock or SystemClock()
        self.health = health or HTTPHealth()
        self.secrets = dict(secrets or {})
        self.echo = echo
        self.base_env = dict(os.environ if base_env is None else base_env)
        run_dir.create()
        self.state = RunState(
            stack=plan.stack,
            config_path=plan.config_path,
            run_id=plan.run_id,
            started_at=self.clock.wall(),
            api_url=plan.api_url,
            controller_url=plan.controller_url,
            timings=dict(plan.timings),
        )
        with contextlib.suppress(psutil.Error):
            self.state.supervisor = ProcRef.of(os.getpid())
        self.slots: dict[str, _Slot] = {}
        for spec in plan.services:
            record = ServiceRecord(
                name=spec.name,
                role=spec.role,
                host=spec.host,
                port=spec.port,
                url=spec.url,
                health_url=spec.health_url,
                log_path=str(run_dir.log_path(spec.name)),
                models=spec.models,
            )
            self.state.services.append(record)
            self.slots[spec.name] = _Slot(spec, record)
        self.stop_requested = False
        self.force = False
        self.reconcile_requested = False
        self._log: IO[str] | None = None
        self.lifecycle = Lifecycle(self)  # models at run time: which workers run when

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.run_dir.write_state(self.state)

    def event(self, message: str, level: str = "INFO") -> None:
        """A supervisor line: into logs/supervisor.log, and onto the console in the foreground."""
        if self._log is None:
            self.run_dir.logs.mkdir(parents=True, exist_ok=True)
            self._log = self.run_dir.log_path("supervisor").open("a", encoding="utf-8")
        stamp = datetime.fromtimestamp(self.clock.wall()).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        self._log.write(f"{stamp} {level} supervisor: {message}\n")
        self._log.flush()
        if self.echo is not None:
            self.echo("supervisor", message)

    def request_stop(self, *_: object) -> None:
        """Signal handler: first call stops gracefully, a second one skips the drain."""
        if self.stop_requested:
            self.force = True
        self.stop_requested = True

    def on_hangup(self, *_: object) -> None:
        """SIGHUP: apply the new plan `up` left in the run directory; without one, a hangup stops the stack."""
        from llmstack.stack.reconcile import request_path

        if request_path(self.run_dir).exists():
            self.reconcile_requested = True
        else:
            self.request_stop()

    def child_env(self, spec: ServiceSpec) -> dict[str, str]:
        env = {k: v for k, v in self.base_env.items() if k not in SECRET_ENV}
        env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.update(spec.env)
        for name in spec.secret_env:
            if self.secrets.get(name):
                env[name] = self.secrets[name]
        env[RUN_ID_ENV] = self.plan.run_id
        return env

    def _spawn(self, slot: _Slot) -> None:
        spec = slot.spec
        slot.child = self.factory(spec, self.child_env(spec), self.run_dir.log_path(spec.name))
        slot.record.proc = slot.child.ref()
        slot.record.spawned_at = self.clock.wall()
        if slot.first_spawn is None:
            slot.first_spawn = self.clock.now()

    def _ready(self, slot: _Slot) -> None:
        rec = slot.record
        rec.state = ServiceState.RUNNING
        rec.ready_at = self.clock.wall()
        rec.message = None
        if rec.first_ready_after is None and slot.first_spawn is not None:
            rec.first_ready_after = round(self.clock.now() - slot.first_spawn, 3)

    def _pump(self) -> None:
        """Foreground: show the services' new log lines."""
        pump = getattr(self.echo, "pump", None)
        if pump is not None:
            pump()

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        return tail_file(self.run_dir.log_path(name), lines)

    # -- start -------------------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start every tier in order, each gated on health. False (and everything stopped) on failure."""
        self.state.phase = Phase.STARTING
        self.save()
        t0 = self.clock.now()
        try:
            for role in START_ORDER:
                deferred = self.lifecycle.deferred
                slots = [s for s in self.slots.values() if s.spec.role == role and not deferred(s.spec.name)]
                # workers of models that load at run time are left to the lifecycle
                if not slots:
                    continue
                tier_t0 = self.clock.now()
                for slot in slots:
                    self.event(f"starting {slot.spec.name} on {slot.spec.url}")
                    slot.record.state = ServiceState.STARTING
                    self._spawn(slot)
                self.save()
                self._await_healthy(slots)
                self.state.timings[role] = round(self.clock.now() - tier_t0, 3)
                self.save()
        except StartFailed as exc:
            self.state.phase = Phase.FAILED
            self.state.message = str(exc)
            self.event(f"start failed: {exc}", "ERROR")
            self.save()
            self.stop_all(self.policy.drain_timeout if not self.force else 0.0, final_phase=Phase.FAILED)
            return False
        self.state.timings["total"] = round(self.clock.now() - t0, 3)
        self.lifecycle.started()
        self.state.phase = Phase.READY
        self.state.ready_at = self.clock.wall()
        self.save()
        self.event("stack ready")
        return True

    def _await_healthy(self, slots: list[_Slot]) -> None:
        deadline = self.clock.now() + self.policy.start_timeout
        pending = {s.spec.name: s for s in slots}
        while pending:
            if self.stop_requested:
                raise StartFailed("interrupted while starting")
            for name, slot in list(pending.items()):
                assert slot.child is not None
                code = slot.child.poll()
                if code is not None:
                    slot.record.state = ServiceState.FAILED
                    slot.record.last_exit = code
                    slot.record.message = f"exited with {describe_exit(code)} while starting"
                    raise StartFailed(
                        f"{name} exited with {describe_exit(code)} before it was healthy; last lines of "
                        f"{self.run_dir.log_path(name)}:\n{self.log_tail(name)}"
                    )
                if self.health(slot.spec):
                    self._ready(slot)
                    elapsed = self.clock.now() - (slot.first_spawn or self.clock.now())
                    self.event(f"{name} healthy after {elapsed:.1f}s")
                    del pending[name]
                    self.save()
            if not pending:
                break
            self._pump()
            if self.clock.now() > deadline:
                names = ", ".join(pending)
                for slot in pending.values():
                    slot.record.state = ServiceState.FAILED
                    slot.record.message = "not healthy before start_timeout"
                last = next(iter(pending))
                raise StartFailed(
                    f"{names} not healthy after {self.policy.start_timeout:g}s (see [stack] start_timeout); "
                    f"last lines of {self.run_dir.log_path(last)}:\n{self.log_tail(last)}"
                )
            self.clock.sleep(self.policy.poll_interval)

    # -- supervise ---------------------------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass: notice exits, schedule or perform restarts, promote recovered services."""
        changed = False
        now = self.clock.now()
        for slot in self.slots.values():
            rec = slot.record
            if rec.state in (ServiceState.RUNNING, ServiceState.RESTARTING) and slot.child is not None:
                code = slot.child.poll()
                if code is not None:
                    self._on_exit(slot, code, now)
                    changed = True
                    continue
            if rec.state == ServiceState.RESTARTING and self.health(slot.spec):
                self._ready(slot)
                self.event(f"{rec.name} is healthy again (restart {rec.restarts})")
                changed = True
            elif rec.state == ServiceState.BACKOFF and slot.restart_at is not None and now >= slot.restart_at:
                rec.restarts += 1
                rec.state = ServiceState.RESTARTING
                slot.restart_at = None
                self.event(f"restarting {rec.name} (restart {rec.restarts})")
                self._spawn(slot)
                changed = True
        if changed:
            self.save()
        self.lifecycle.tick()

    def _on_exit(self, slot: _Slot, code: int, now: float) -> None:
        rec = slot.record
        rec.last_exit = code
        slot.child = None
        slot.crashes.append(now)
        while slot.crashes and now - slot.crashes[0] > self.policy.crash_loop_window:
            slot.crashes.popleft()
        n = len(slot.crashes)
        if n > self.policy.crash_loop_restarts:
            rec.state = ServiceState.FAILED
            rec.message = (
                f"crash loop: exited {n} times within {self.policy.crash_loop_window:g}s "
                f"(last: {describe_exit(code)}); not restarting it any more"
            )
            self.event(f"{rec.name}: {rec.message}. Last lines of its log:\n{self.log_tail(rec.name)}", "ERROR")
            return
        delay = min(self.policy.restart_backoff * 2 ** (n - 1), self.policy.restart_backoff_max)
        rec.state = ServiceState.BACKOFF
        rec.message = f"exited with {describe_exit(code)}; restarting in {delay:g}s"
        slot.restart_at = now + delay
        self.event(f"{rec.name} {rec.message}", "WARNING")

    def run(self, on_ready: Callable[[Supervisor], None] | None = None) -> int:
        """Start, then supervise until asked to stop; returns the exit code for `up`."""
        self.lifecycle.open()  # the admin API; closed by stop_all
        if not self.start():
            return 1
        if on_ready is not None:
            on_ready(self)
        while not self.stop_requested:
            if self.reconcile_requested:
                from llmstack.stack.reconcile_apply import apply_pending

                self.reconcile_requested = False
                apply_pending(self)
            self.tick()
            self._pump()
            self.clock.sleep(self.policy.poll_interval)
        self.stop_all(0.0 if self.force else self.policy.drain_timeout)
        return 0

    # -- stop --------------------------------------------------------------------------------------------------
    def stop_all(self, timeout: float, final_phase: Phase = Phase.STOPPED) -> None:
        """Drain, then kill, tier by tier; the state ends with every service stopped."""
        if self.state.phase != Phase.FAILED:
            self.state.phase = Phase.STOPPING
        self.save()
        self.event(f"stopping (drain timeout {timeout:g}s)")
        targets: list[list[Stoppable]] = []
        for tier in STOP_TIERS:
            group: list[Stoppable] = []
            for slot in self.slots.values():
                if slot.spec.role in tier and slot.child is not None:
                    group.append(_ChildStop(slot.spec.name, slot.child))
                    if slot.record.state != ServiceState.FAILED:
                        slot.record.state = ServiceState.STOPPING
            targets.append(group)
        self.save()
        stop_tiers(targets, timeout, self.clock, on_kill=lambda n: self.event(f"{n} did not drain in time; killed"))
        for slot in self.slots.values():
            if slot.child is not None:
                code = slot.child.poll()
                slot.record.last_exit = code
                slot.child = None
            if slot.record.state != ServiceState.FAILED:
                slot.record.state = ServiceState.STOPPED
        self.state.phase = final_phase
        self.save()
        self.lifecycle.close()
        self.event("stopped")


def install_signal_handlers(sup: Supervisor) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, sup.request_stop)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGHUP, sup.on_hangup)


def supervisor_argv(run_dir: Path) -> list[str]:
    """How `up --detach` starts the supervisor as its own background process."""
    return [sys.executable, "-m", "llmstack", "up", "--foreground-supervisor", "--run-dir", str(run_dir)]
