"""`llmstack tunnel`: reach a stack on a remote box from a laptop through SSH port forwards.

It runs the system's `ssh -N -L ...` (so the user's ssh config, agent and keys apply, and a password,
if one is asked, goes straight to ssh and is never seen or kept here), checks the local ports first,
waits until the forwards accept connections, and restarts ssh with backoff whenever it exits.
"""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from llmstack.common.net import port_is_free, reach_host

SERVER_ALIVE_INTERVAL = 15
SERVER_ALIVE_COUNT_MAX = 3
CONNECT_TIMEOUT = 10
STABLE_AFTER = 60.0  # a connection that lived this long resets the backoff

# ssh failures that retrying cannot fix (when the tunnel never came up at all)
FATAL_SSH_ERRORS = (
    "Permission denied",
    "Host key verification failed",
    "Could not resolve hostname",
    "Bad configuration option",
    "no argument after keyword",
    "Identity file",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
)


class TunnelError(Exception):
    """The tunnel cannot be set up (ssh refusing for good, nothing to connect to); the message says why."""


class PortBusy(TunnelError):
    """A local port for a forward is taken by another program."""


@dataclass(frozen=True)
class Forward:
    """One `-L 127.0.0.1:local:remote_host:remote` forward; `name` labels it for people."""

    name: str
    local_port: int
    remote_port: int
    remote_host: str = "127.0.0.1"
    path: str = "/"

    def spec(self) -> str:
        return f"127.0.0.1:{self.local_port}:{self.remote_host}:{self.remote_port}"

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}{self.path}"


@dataclass
class TunnelSpec:
    destination: str  # [user@]host
    forwards: list[Forward]
    port: int | None = None
    identity_file: str | None = None
    ssh_options: list[str] = field(default_factory=list)  # extra `-o KEY=VALUE`
    ssh: str = "ssh"

    def command(self) -> list[str]:
        cmd = [self.ssh, "-N"]
        for fwd in self.forwards:
            cmd += ["-L", fwd.spec()]
        if self.port is not None:
            cmd += ["-p", str(self.port)]
        if self.identity_file:
            cmd += ["-i", self.identity_file]
        cmd += [
            "-o", "ExitOnForwardFailure=yes",
            "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
            "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}",
            "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        ]  # fmt: skip
        for opt in self.ssh_options:
            cmd += ["-o", opt]
        cmd.append(self.destination)
        return cmd

    def shell_command(self) -> str:
        return shlex.join(self.command())


@dataclass
class ServerDefaults:
    """What the stack file says about the server side, as plain values (`cli/faces.py` reads them)."""

    destination: str | None = None
    ssh_port: int = 22
    identity_file: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    local_api_port: int | None = None
    webui_enabled: bool = True
    webui_host: str = "127.0.0.1"
    webui_port: int = 7860
    local_webui_port: int | None = None


def plan_tunnel(
    server: ServerDefaults | None = None,
    *,
    destination: str | None = None,
    ssh_port: int | None = None,
    identity_file: str | None = None,
    local_api_port: int | None = None,
    local_webui_port: int | None = None,
    api_port: int | None = None,
    webui_port: int | None = None,
    webui: bool = True,
    ssh_options: list[str] | None = None,
) -> TunnelSpec:
    """The tunnel for a stack: arguments first, then the stack file's (`[tunnel]`, and the `[api]`/`[webui]`
    ports on the server), then defaults. Local ports default to the server's, so URLs look the same."""
    s = server or ServerDefaults()
    destination = destination or s.destination
    if not destination:
        raise TunnelError("which server? give [user@]host, or set [tunnel] host in stack.toml")
    remote_api = api_port or s.api_port
    forwards = [
        Forward("api", local_api_port or s.local_api_port or remote_api, remote_api, reach_host(s.api_host), "/v1")
    ]
    if webui and (s.webui_enabled or webui_port):
        remote_web = webui_port or s.webui_port
        local_web = local_webui_port or s.local_webui_port or remote_web
        forwards.append(Forward("webui", local_web, remote_web, reach_host(s.webui_host), "/"))
    if ssh_port is None and s.ssh_port != 22:
        ssh_port = s.ssh_port
    return TunnelSpec(destination, forwards, ssh_port, identity_file or s.identity_file, list(ssh_options or []))


def check_local_ports(forwards: list[Forward]) -> None:
    seen: dict[int, str] = {}
    for fwd in forwards:
        if fwd.local_port in seen:
            raise PortBusy(f"local port {fwd.local_port} is used for both {seen[fwd.local_port]} and {fwd.name}")
        seen[fwd.local_port] = fwd.name
        if not port_is_free(fwd.local_port):
            flag = "--local-api-port" if fwd.name == "api" else "--local-webui-port"
            raise PortBusy(
                f"local port {fwd.local_port} (for the {fwd.name}) is already in use on this machine; "
                f"pick another with {flag} N"
            )


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Tunnel:
    """Runs ssh until stopped, restarting it with exponential backoff (1 s doubling to `max_backoff`)."""

    def __init__(
        self,
        spec: TunnelSpec,
        *,
        say: Callable[[str], None] = print,
        max_backoff: float = 30.0,
        max_attempts: int = 0,
        first_backoff: float = 1.0,
    ) -> None:
        self.spec = spec
        self.say = say
        self.max_backoff = max_backoff
        self.first_backoff = first_backoff
        self.max_attempts = max_attempts  # 0: forever
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: deque[str] = deque(maxlen=20)

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler: it only sets a flag)."""
        self._stop.set()

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _pump_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                self.say(f"ssh: {line}")

    def _wait_up(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once every forward accepts connections; False if ssh exited first or we are stopping."""
        while not self._stop.is_set() and proc.poll() is None:
            if all(_accepting(f.local_port) for f in self.spec.forwards):
                return True
            self._stop.wait(0.2)
        return False

    def _attempt(self) -> tuple[int | None, bool, float]:
        """Run ssh once: (exit code or None when stopping, whether the forwards came up, seconds it ran)."""
        self._stderr.clear()
        started = time.monotonic()
        self._proc = proc = subprocess.Popen(self.spec.command(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        pump = threading.Thread(target=self._pump_stderr, args=(proc,), daemon=True)
        pump.start()
        up = self._wait_up(proc)
        if up:
            self.say(f"tunnel up via {self.spec.destination} (ssh pid {proc.pid}):")
            for fwd in self.spec.forwards:
                self.say(f"  {fwd.name:<6} {fwd.local_url}")
            self.say("Ctrl-C to stop.")
        while proc.poll() is None and not self._stop.is_set():
            self._stop.wait(0.5)
        if self._stop.is_set():
            return None, up, time.monotonic() - started
        code = proc.wait()
        pump.join(2)
        return code, up, time.monotonic() - started

    def run(self) -> int:
        """Blocks until `stop()` (returns 0); raises TunnelError when retrying is pointless."""
        check_local_ports(self.spec.forwards)
        backoff = self.first_backoff
        attempts = 0
        ever_up = False
        try:
            while not self._stop.is_set():
                attempts += 1
                code, up, lasted = self._attempt()
                ever_up |= up
                if code is None:
                    break
                tail = " | ".join(self._stderr) or "no message"
                if not ever_up and any(marker in tail for marker in FATAL_SSH_ERRORS):
                    raise TunnelError(f"ssh to {self.spec.destination} failed (exit {code}): {tail}")
                if self.max_attempts and attempts >= self.max_attempts:
                    raise TunnelError(f"ssh exited with code {code} after {attempts} attempts: {tail}")
                if lasted >= STABLE_AFTER:
                    backoff = self.first_backoff
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                self.say(f"ssh {how}; reconnecting in {backoff:g}s")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        finally:
            self._terminate()
        return 0


def run_tunnel(spec: TunnelSpec, say: Callable[[str], None] = print) -> int:
    """Run in the foreground: Ctrl-C or SIGTERM stop ssh and return 0."""
    tunnel = Tunnel(spec, say=say)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        tunnel.stop()

    # ssh shares our process group, so Ctrl-C reaches it too; either way we end it and exit cleanly
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = tunnel.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("tunnel stopped")
    sys.stdout.flush()
    return code
