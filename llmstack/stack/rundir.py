"""The run directory: what a running stack leaves on disk so `status`, `logs` and `down` work from any shell.

Layout (``~/.llmstack/<stack name>`` unless ``[stack] run_dir`` says otherwise)::

    state.json        pids, process groups, create times, ports, start times, restarts, log paths
    plan.json         the services to run (argv, health URLs); no secrets
    cluster_token     generated when ``[stack] cluster_token`` is unset (mode 0600)
    logs/<service>.log  one file per service, written by the service itself (never through a pipe, so
                        the services outlive a killed supervisor without dying of SIGPIPE)

Processes are identified by pid *and* create time, so a pid the kernel reused for an unrelated program is
never signalled. Every process of a stack also carries ``LLMSTACK_RUN_ID`` in its environment, which lets
`down` find stragglers that escaped their process group after the supervisor was killed.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, Field

from llmstack.stack.config import StackConfig

RUN_ID_ENV = "LLMSTACK_RUN_ID"
STATE_VERSION = 1
Role = Literal["ray", "controller", "workers", "api", "webui"]


def run_dir_for(cfg: StackConfig) -> Path:
    """``[stack] run_dir`` (relative to the stack.toml), else ``~/.llmstack/<name>``."""
    if cfg.stack.run_dir:
        return cfg.resolve_path(cfg.stack.run_dir)
    return Path.home() / ".llmstack" / cfg.stack.name


# -- processes ------------------------------------------------------------------------------------------
class ProcRef(BaseModel):
    """A process as recorded: pid plus create time (pid-reuse safe) and its process group."""

    pid: int
    pgid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcRef:
        proc = psutil.Process(pid)
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            pgid = pid
        return cls(pid=pid, pgid=pgid, create_time=proc.create_time())

    def process(self) -> psutil.Process | None:
        """The live process, or None when it exited (or its pid now belongs to another program)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def members(self) -> list[psutil.Process]:
        """Every live process of this service: the leader, its descendants and its process group (which
        keeps grandchildren whose parent died). Group members born before the leader are someone else's."""
        found: dict[int, psutil.Process] = {}
        leader = self.process()
        if leader is not None:
            found[leader.pid] = leader
            with contextlib.suppress(psutil.Error):
                for child in leader.children(recursive=True):
                    found[child.pid] = child
        if self.pgid != self.pid:
            return [p for p in found.values() if _running(p)]  # not its own group (a foreground `up`)
        for proc in psutil.process_iter(["create_time"]):
            if proc.pid in found:
                continue
            try:
                if os.getpgid(proc.pid) == self.pgid and proc.info["create_time"] >= self.create_time - 0.01:
                    found[proc.pid] = proc
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return [p for p in found.values() if _running(p)]

    def signal(self, sig: int) -> bool:
        """Signal the leader only (graceful stop lets it drain); False when it is gone."""
        proc = self.process()
        if proc is None:
            return False
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            return True
        return False

    def kill_tree(self) -> int:
        """SIGKILL every member; returns how many were signalled."""
        return kill_all(self.members())


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_all(procs: Iterable[psutil.Process], sig: int = signal.SIGKILL) -> int:
    n = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            n += 1
    return n


def marked_processes(run_id: str) -> list[psutil.Process]:
    """Processes whose environment carries this run's id: every process the stack spawned, wherever it
    ended up (reparented to init, own session). Our own process is never included."""
    me = os.getpid()
    out = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(RUN_ID_ENV) == run_id and _running(proc):
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


# -- state ----------------------------------------------------------------------------------------------
class ServiceState(enum.StrEnum):
    PENDING = "pending"  # not started yet
    STARTING = "starting"  # spawned, waiting for its health endpoint
    RUNNING = "running"  # healthy
    BACKOFF = "backoff"  # crashed; restart scheduled
    RESTARTING = "restarting"  # respawned after a crash, waiting for health
    FAILED = "failed"  # crash loop or start failure: not restarted any more
    STOPPING = "stopping"
    STOPPED = "stopped"
    UNLOADED = "unloaded"  # a worker whose model is not loaded now (on demand, manual, or unloaded)


class ServiceRecord(BaseModel):
    name: str
    role: Role
    host: str
    port: int
    url: str
    health_url: str
    log_path: str
    models: list[str] = Field(default_factory=list)
    state: ServiceState = ServiceState.PENDING
    proc: ProcRef | None = None
    spawned_at: float | None = None  # wall clock of the latest spawn
    ready_at: float | None = None  # wall clock when it last became healthy
    first_ready_after: float | None = None  # seconds from first spawn to first healthy
    restarts: int = 0
    last_exit: int | None = None
    message: str | None = None


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class RunState(BaseModel):
    version: int = STATE_VERSION
    stack: str
    config_path: str | None = None
    run_id: str
    phase: Phase = Phase.STARTING
    message: str | None = None
    supervisor: ProcRef | None = None
    started_at: float = Field(default_factory=time.time)
    ready_at: float | None = None
    api_url: str | None = None
    controller_url: str | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per start step")
    services: list[ServiceRecord] = Field(default_factory=list)

    def service(self, name: str) -> ServiceRecord:
        for rec in self.services:
            if rec.name == name:
                return rec
        raise KeyError(name)


class RunDir:
    """Paths inside one stack's run directory, with atomic reads and writes of its JSON files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.state_path = self.root / "state.json"
        self.plan_path = self.root / "plan.json"
        self.token_path = self.root / "cluster_token"
        self.logs = self.root / "logs"

    def create(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.root, 0o700)  # logs may quote prompts; keep them to the owner

    def log_path(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def rotate_logs(self) -> None:
        """Keep one previous generation (`X.log.1`) so a new `up` starts with clean files."""
        for log in self.logs.glob("*.log"):
            os.replace(log, log.with_name(log.name + ".1"))

    def read_state(self) -> RunState | None:
        try:
            return RunState.model_validate_json(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # half-written by a crashed older version: treat as absent

    def write_state(self, state: RunState) -> None:
        _atomic_write(self.state_path, state.model_dump_json(indent=2))

    def write_json(self, path: Path, data: object) -> None:
        _atomic_write(path, json.dumps(data, indent=2))

    def cluster_token(self) -> str:
        """The stack's generated cluster token, created once (mode 0600) and reused by later runs."""
        with contextlib.suppress(FileNotFoundError):
            token = self.token_path.read_text(encoding="utf-8").strip()
            if token:
                return token
        token = secrets.token_urlsafe(32)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(token + "\n")
        os.chmod(self.token_path, 0o600)
        return token

    def stored_token(self) -> str | None:
        try:
            return self.token_path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None


def _atomic_write(path: Path, text: str) -> None:
    """Readers in other shells never see half a file: write aside, then rename over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
