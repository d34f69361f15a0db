"""Process supervision for `llmstack up`: spawn, gate on health, restart with backoff, stop cleanly.

One loop in one thread owns every child (as honcho does): it polls exits, health endpoints and the
restart schedule, and writes the run state after every change, so other shells see what it sees.

- Start order: controller -> workers (spawned together, gated together) -> api -> webui. Any exit or
  timeout while starting aborts the whole start: what was started is stopped, and the cause is reported
  with the tail of that service's log.
- After start, a child that exits is restarted after ``restart_backoff * 2**(crashes-1)`` seconds (capped).
  More than ``crash_loop_restarts`` crashes within ``crash_loop_window`` seconds is a crash loop: the
  service is marked failed, with its last log lines, and left alone.
- Stop: in tiers (webui+api, then workers, then controller), SIGTERM to each leader so uvicorn drains
  in-flight requests, then SIGKILL to whatever is left of each process tree when the deadline passes.

Children run in their own session (process group) and write straight to their log file, so neither a
Ctrl-C in the terminal nor the death of the supervisor takes them down uncontrolled. The process
factory, the clock and the health check are parameters, so the loop is unit-testable without processes.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Protocol

import httpx
from pydantic import BaseModel, Field

from .runstate import (
    RUN_ID_ENV,
    Phase,
    ProcRef,
    Role,
    RunDir,
    RunState,
    ServiceRecord,
    ServiceState,
)

#: Environment variables that carry secrets; children get only those their spec grants.
SECRET_ENV = ("LLMSTACK_CLUSTER_TOKEN", "LLMSTACK_API_KEYS", "LLMSTACK_API_KEY", "LLMSTACK_WEBUI_AUTH")
START_ORDER: tuple[Role, ...] = ("controller", "workers", "api", "webui")
STOP_TIERS: tuple[tuple[Role, ...], ...] = (("webui", "api"), ("workers",), ("controller",))
LOG_TAIL_LINES = 20


# -- what to run -------------------------------------------------------------------------------------------
class ServiceSpec(BaseModel):
    """One child process: its command line, environment (secrets by name only) and health endpoint."""

    name: str
    role: Role
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: list[str] = Field(default_factory=list, description="names of SECRET_ENV variables to pass")
    host: str
    port: int
    url: str
    health_url: str
    models: list[str] = Field(default_factory=list, description="names a worker serves")
    expect_models: list[str] = Field(default_factory=list, description="api: healthy once these are routable")


class Policy(BaseModel):
    start_timeout: float = 900.0
    restart_backoff: float = 1.0
    restart_backoff_max: float = 30.0
    crash_loop_restarts: int = 5
    crash_loop_window: float = 120.0
    drain_timeout: float = 30.0
    poll_interval: float = 0.2


class Plan(BaseModel):
    """Everything the supervisor needs, written to the run directory (no secrets in it)."""

    stack: str
    config_path: str | None = None
    run_id: str
    policy: Policy = Policy()
    services: list[ServiceSpec]
    api_url: str | None = None
    controller_url: str | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="steps before the supervisor (downloads)")


# -- injectable parts ------------------------------------------------------------------------------------------
class Child(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def ref(self) -> ProcRef | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


ProcessFactory = Callable[[ServiceSpec, dict[str, str], Path], Child]
HealthCheck = Callable[[ServiceSpec], bool]


class Clock(Protocol):
    def now(self) -> float: ...

    def wall(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class PopenChild:
    """A real child: its own session, stdout+stderr appended to its log file, stdin closed."""

    def __init__(self, spec: ServiceSpec, env: dict[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
            log.write(f"{stamp} INFO supervisor: starting {spec.name}: {' '.join(spec.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self.pid = self.popen.pid
        self._ref: ProcRef | None = None
        with contextlib.suppress(Exception):
            self._ref = ProcRef.of(self.pid)

    def poll(self) -> int | None:
        return self.popen.poll()

    def ref(self) -> ProcRef | None:
        return self._ref

    def terminate(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self._ref is not None:
            self._ref.kill_tree()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def spawn_process(spec: ServiceSpec, env: dict[str, str], log_path: Path) -> Child:
    return PopenChild(spec, env, log_path)


class HTTPHealth:
    """GET the health URL: 200 (and, for the api, every expected model routable; for a worker,
    status "ok") means healthy. Loopback services: no proxies from the environment."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.client = httpx.Client(timeout=timeout, trust_env=False, verify=False)  # self-signed local TLS

    def __call__(self, spec: ServiceSpec) -> bool:
        try:
            resp = self.client.get(spec.health_url)
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        if spec.role not in ("workers", "api"):
            return True
        try:
            body = resp.json()
        except ValueError:
            return False
        if spec.role == "workers":
            return body.get("status") == "ok"
        return set(spec.expect_models) <= set(body.get("models") or [])


# -- the supervisor ------------------------------------------------------------------------------------------------
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
        with contextlib.suppress(Exception):
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
        self._log: IO[str] | None = None

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
                slots = [s for s in self.slots.values() if s.spec.role == role]
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
        if not self.start():
            return 1
        if on_ready is not None:
            on_ready(self)
        while not self.stop_requested:
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
        self.event("stopped")


class Stoppable(Protocol):
    name: str

    def alive(self) -> bool: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class _ChildStop:
    def __init__(self, name: str, child: Child) -> None:
        self.name = name
        self.child = child

    def alive(self) -> bool:
        return self.child.poll() is None

    def terminate(self) -> None:
        self.child.terminate()

    def kill(self) -> None:
        self.child.kill()


class RecordedStop:
    """A service known only from the run state (its supervisor is gone): pid + create time + group."""

    def __init__(self, name: str, ref: ProcRef) -> None:
        self.name = name
        self.ref = ref

    def alive(self) -> bool:
        return self.ref.alive()

    def terminate(self) -> None:
        self.ref.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.ref.kill_tree()


def stop_tiers(
    tiers: Sequence[Iterable[Stoppable]],
    timeout: float,
    clock: Clock | None = None,
    on_kill: Callable[[str], None] | None = None,
    min_grace: float = 2.0,
) -> None:
    """SIGTERM each tier, wait for it to drain (sharing one overall deadline, with at least `min_grace`
    per tier so each gets to shut down cleanly), then kill what remains of every tree in it."""
    clock = clock or SystemClock()
    deadline = clock.now() + timeout
    for tier in tiers:
        procs = list(tier)
        for proc in procs:
            if proc.alive():
                proc.terminate()
        tier_deadline = max(deadline, clock.now() + min(min_grace, timeout))
        while any(p.alive() for p in procs) and clock.now() < tier_deadline:
            clock.sleep(0.05)
        for proc in procs:
            if proc.alive() and on_kill is not None:
                on_kill(proc.name)
            proc.kill()  # also reaps stragglers of a leader that exited on its own


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


# -- logs ------------------------------------------------------------------------------------------------------------
def tail_file(path: Path, lines: int) -> str:
    """The last `lines` lines of a (possibly large) file, read from the end."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            block = min(size, max(4096, lines * 400))
            fh.seek(size - block)
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[,.]\d+)?)")


def line_time(line: str) -> str | None:
    """The leading timestamp of a log line (as written by the services), sortable as text."""
    m = _STAMP.match(line)
    return m.group(1).replace("T", " ").replace(".", ",") if m else None


def merge_logs(sources: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Interleave per-service lines by timestamp; lines without one (tracebacks) keep their place after
    the line before them."""
    keyed: list[tuple[str, int, int, str, str]] = []
    for order, (name, lines) in enumerate(sources.items()):
        current = ""
        for i, line in enumerate(lines):
            current = line_time(line) or current
            keyed.append((current, order, i, name, line))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [(name, line) for _, _, _, name, line in keyed]


class LogFollower:
    """Follows several log files (by offset), yielding complete new lines; survives truncation."""

    def __init__(self, paths: dict[str, Path], from_end: bool = True) -> None:
        self.paths = paths
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, bytes] = {}
        for name, path in paths.items():
            self.offsets[name] = path.stat().st_size if from_end and path.exists() else 0

    def add(self, name: str, path: Path) -> None:
        if name not in self.paths:
            self.paths[name] = path
            self.offsets[name] = 0

    def poll(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name, path in self.paths.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size < self.offsets[name]:
                self.offsets[name] = 0  # rotated or truncated
            if size == self.offsets[name]:
                continue
            with path.open("rb") as fh:
                fh.seek(self.offsets[name])
                data = self.partial.pop(name, b"") + fh.read(size - self.offsets[name])
            self.offsets[name] = size
            *complete, rest = data.split(b"\n")
            if rest:
                self.partial[name] = rest
            out.extend((name, line.decode("utf-8", errors="replace")) for line in complete)
        return out


COLORS = ("cyan", "green", "magenta", "yellow", "blue", "bright_red", "bright_cyan", "bright_green")


class PrefixPrinter:
    """Name-padded, coloured prefixes (`api        | ...`) on a rich console: one printer for all sources."""

    def __init__(self, names: Iterable[str], console: object | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(highlight=False, soft_wrap=True)
        self.names: list[str] = []
        self.width = 0
        for name in names:
            self._add(name)

    def _add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)
            self.width = max(self.width, len(name))

    def __call__(self, name: str, line: str) -> None:
        from rich.text import Text

        self._add(name)
        style = "bold red" if name == "supervisor" else COLORS[self.names.index(name) % len(COLORS)]
        text = Text(f"{name:<{self.width}} | ", style=style)
        text.append(line)
        self.console.print(text, soft_wrap=True)  # type: ignore[attr-defined]


class ForegroundEcho:
    """Foreground `up`: supervisor events and every service's new log lines through one printer."""

    def __init__(self, printer: PrefixPrinter, follower: LogFollower) -> None:
        self.printer = printer
        self.follower = follower

    def __call__(self, name: str, line: str) -> None:
        self.pump()
        for part in line.splitlines() or [""]:
            self.printer(name, part)

    def pump(self) -> None:
        for name, line in self.follower.poll():
            self.printer(name, line)


def install_signal_handlers(sup: Supervisor) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, sup.request_stop)


def supervisor_argv(run_dir: Path) -> list[str]:
    """How `up --detach` starts the supervisor as its own background process."""
    return [sys.executable, "-m", "llmstack", "up", "--foreground-supervisor", "--run-dir", str(run_dir)]
