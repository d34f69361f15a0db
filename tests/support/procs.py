"""Run real llmstack services (``python -m llmstack <service> ...``) on loopback for end-to-end tests.

Each service runs in its own session (process group), so stopping it also stops whatever it spawned
(vLLM engine processes, uvicorn workers); output goes to a log file whose tail is shown when it fails.
Nothing may outlive a test: use :class:`Service` as a context manager, or the ``services`` fixture
(a :class:`ServiceGroup`), and as a last resort an ``atexit`` hook kills whatever is still running.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Environment every service gets unless the caller overrides it: no network, unbuffered logs.
DEFAULT_ENV: dict[str, str] = {
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
}


def run_llmstack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m llmstack ARGS` to completion, output captured (wide, so rich tables do not wrap)."""
    env = {**os.environ, **DEFAULT_ENV, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "llmstack", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=timeout,
    )


_LIVE: set[Service] = set()  # strong refs: a dropped Service must still be killed at exit


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; a tiny race with other binders remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ServiceError(AssertionError):
    """A service died or never became healthy; the message carries the tail of its log."""


class Service:
    """One ``python -m llmstack`` child in its own process group, logging to ``log_dir/<name>.log``."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        module: str = "llmstack",
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = Path(log_dir) / f"{name}.log"
        self.cmd = [sys.executable, "-m", module, *self.args]
        self.env = {**os.environ, **DEFAULT_ENV, **(env or {})}
        self.cwd = cwd or REPO_ROOT
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # lifecycle -------------------------------------------------------------------------------------

    def start(self) -> Service:
        """Spawn the process (idempotent guard: starting twice is a test bug)."""
        if self.proc is not None:
            raise RuntimeError(f"service {self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"$ {' '.join(self.cmd)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"service {self.name} not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status if it has exited (negative: killed by that signal), else None."""
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, url: str, timeout: float = 60.0, interval: float = 0.1) -> httpx.Response:
        """Poll GET ``url`` until it answers 200; fail at once, with the log tail, if the process exits."""
        deadline = time.monotonic() + timeout
        last = "no attempt yet"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if not self.alive():
                    what = f"exited with {self.returncode} before {url} was healthy"
                    raise ServiceError(self._failure(what))
                try:
                    resp = client.get(url)
                    if resp.status_code == 200:
                        return resp
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise ServiceError(self._failure(f"not healthy at {url} after {timeout:.0f}s ({last})"))
                time.sleep(interval)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; returns the exit status."""
        if self.proc is None:
            raise RuntimeError(f"service {self.name} not started")
        return self.proc.wait(timeout)

    def signal(self, sig: int, *, group: bool = True) -> None:
        """Send ``sig`` to the whole process group (default) or to the leader only."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it; returns the exit status."""
        if self.proc is None:
            return None
        grace = min(timeout, 3.0)
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
                grace = 0.0
        self._reap_group(grace)
        self._close_log()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole process group now (simulates a crash); returns the exit status."""
        if self.proc is None:
            return None
        self.signal(signal.SIGKILL)
        self.proc.wait(5)
        self._close_log()
        return self.proc.returncode

    def _reap_group(self, grace: float) -> None:
        """After the leader exits, give stragglers in its group ``grace`` seconds, then SIGKILL them."""
        assert self.proc is not None
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)
        self.signal(signal.SIGKILL)

    def _close_log(self) -> None:
        _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    # logs ------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the service has written so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_text(), lines)

    def _failure(self, what: str) -> str:
        header = f"service {self.name} (pid {self.pid}) {what}"
        return f"{header}\n--- {self.log_path} (tail) ---\n{self.log_tail()}"

    # context manager -------------------------------------------------------------------------------

    def __enter__(self) -> Service:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid={self.proc.pid} rc={self.returncode}"
        return f"Service({self.name!r}, {state})"


class ServiceGroup:
    """Services started for one test (or one fixture scope), stopped together in reverse start order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.services: list[Service] = []

    def start(self, name: str, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> Service:
        """Start ``python -m llmstack *args`` as ``name``; it is stopped when the group is."""
        service = Service(name, [str(a) for a in args], self.log_dir, env=env, **kwargs)
        self.services.append(service)
        return service.start()

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every service (newest first, so clients go before the servers they talk to)."""
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop(timeout)

    def logs(self, lines: int = 40) -> str:
        """Tails of every service log, for assertion messages."""
        return "\n".join(f"--- {s.name} ---\n{s.log_tail(lines)}" for s in self.services)

    def __iter__(self) -> Iterator[Service]:
        return iter(self.services)

    def __enter__(self) -> ServiceGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort (e.g. an interrupted session): no child process group survives the test process."""
    for service in list(_LIVE):
        with contextlib.suppress(Exception):
            service.kill()
