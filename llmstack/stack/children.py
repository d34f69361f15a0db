"""The supervisor's children: real processes (their own session, output to a log file), the clock,
the health check, and stopping process trees in tiers.  All injectable, so the supervisor loop is testable
without processes."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import httpx
import psutil

from llmstack.common.net import judge_health, tcp_open, tcp_target
from llmstack.stack.plan import ServiceSpec
from llmstack.stack.rundir import ProcRef, Role

STOP_TIERS: tuple[tuple[Role, ...], ...] = (("webui", "api"), ("workers",), ("controller",), ("ray",))


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
        with contextlib.suppress(psutil.Error):  # it exited already: poll() tells
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
    """GET the health URL and judge it (`net.judge_health`: 200, status "ok", the api's expected models
    routable). Loopback services: no proxies from the environment."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.client = httpx.Client(timeout=timeout, trust_env=False, verify=False)  # self-signed local TLS

    def __call__(self, spec: ServiceSpec) -> bool:
        target = tcp_target(spec.health_url)
        if target is not None:  # a Ray node: its raylet accepts connections
            return tcp_open(*target, timeout=1.0)
        try:
            resp = self.client.get(spec.health_url)
        except httpx.HTTPError:
            return False
        return judge_health(resp, spec.expect_models)[0]


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
