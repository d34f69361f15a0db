"""`llmstack up` on a running stack: what differs between the plan the supervisor runs and the one stack.toml
describes now, and how that is shown (as `docker compose up` shows it).

Each service of the new plan is compared with the running one of the same name, on everything that reaches the
process: command line, environment, secrets (by keyed hash only), address. The outcome per service is one of

    start     new in stack.toml
    restart   its settings changed (or it had failed): drained, then started again with the new ones
    stop      no longer in stack.toml
    keep      unchanged: its process is not touched

The API server's list of expected models is only a health gate, not a setting of the process: adding a model
never restarts the API server. Supervision settings (start timeout, backoff, crash-loop limits) apply live.
How a change is applied lives in `reconcile_apply.py` (the supervisor's side) and `reconcile_request.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from pydantic import BaseModel, Field

from llmstack.stack.config import FIRST_WORKER_PORT, StackConfig
from llmstack.stack.plan import Plan, ServiceSpec, service_url, worker_service_names
from llmstack.stack.rundir import Role, RunDir

ROLE_ORDER: tuple[str, ...] = get_args(Role)  # how the plan lists services: start order

#: ServiceSpec fields that are gates or bookkeeping of the supervisor, not settings of the process.
NOT_SETTINGS = {"expect_models"}


class Action(enum.StrEnum):
    START = "start"
    RESTART = "restart"
    STOP = "stop"
    KEEP = "keep"


@dataclass(frozen=True)
class Change:
    name: str
    role: str
    action: Action
    reasons: tuple[str, ...] = ()


@dataclass
class Diff:
    """Per service what happens, plus notes (live changes, consequences) and blockers (needs down/up)."""

    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    policy_changed: bool = False

    def named(self, *actions: Action) -> list[str]:
        return [c.name for c in self.changes if c.action in actions]

    @property
    def empty(self) -> bool:
        """Nothing to do: every service kept and no setting to apply live."""
        return not self.policy_changed and all(c.action == Action.KEEP for c in self.changes)

    def summary(self) -> str:
        counts = {a: len(self.named(a)) for a in Action}
        return (
            f"{counts[Action.START]} to start, {counts[Action.RESTART]} to restart, "
            f"{counts[Action.STOP]} to stop, {counts[Action.KEEP]} unchanged"
        )


def _options(argv: list[str]) -> dict[str, str | None]:
    """`--flag value` pairs and bare `--flag`s of a command line (what comes before the first flag keyed by
    position, so a different interpreter or command shows too)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv) and not argv[i].startswith("--"):
        out[f"#{i}"] = argv[i]
        i += 1
    while i < len(argv):
        flag = argv[i]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[flag] = argv[i + 1]
            i += 2
        else:
            out[flag] = None
            i += 1
    return out


def _shown(value: str | None, limit: int = 60) -> str:
    if value is None:
        return "on"
    return value if len(value) <= limit else value[: limit - 3] + "..."


def argv_changes(old: list[str], new: list[str]) -> list[str]:
    """The command line's differences in words: `--port 21002 -> 21005`, `--load-8bit added`."""
    a, b = _options(old), _options(new)
    out = []
    for key in [*a, *(k for k in b if k not in a)]:
        label = "program" if key.startswith("#") else key
        if key not in b:
            out.append(f"{label} removed")
        elif key not in a:
            out.append(f"{label} {_shown(b[key])} added" if b[key] is not None else f"{label} added")
        elif a[key] != b[key]:
            out.append(f"{label} {_shown(a[key])} -> {_shown(b[key])}")
    if not out and old != new:
        out.append("command line changed")
    return out


def spec_changes(
    old: ServiceSpec, new: ServiceSpec, old_secrets: dict[str, str] | None, new_secrets: dict[str, str] | None
) -> list[str]:
    """Why a running service must restart to match the new plan; empty when it need not."""
    reasons = argv_changes(old.argv, new.argv)
    for key in sorted(set(old.env) | set(new.env)):
        if old.env.get(key) != new.env.get(key):  # values are not shown: they may be tokens
            reasons.append(f"env {key} {_how(key, old.env, new.env)}")
    if old_secrets is not None and new_secrets is not None:  # unknown for a stack started without digests
        for name in sorted(set(old_secrets) | set(new_secrets)):
            if old_secrets.get(name) != new_secrets.get(name):
                reasons.append(f"secret {name} {_how(name, old_secrets, new_secrets)}")
    elif sorted(old.secret_env) != sorted(new.secret_env):
        reasons.append("secrets it gets changed")
    skip = NOT_SETTINGS | {"argv", "env", "secret_env", "name"}
    for key, value in new.model_dump(exclude=skip).items():
        if getattr(old, key) != value and not reasons:  # ports and addresses normally show in argv already
            reasons.append(f"{key} {getattr(old, key)!r} -> {value!r}")
    return reasons


def _how(key: str, old: dict[str, str], new: dict[str, str]) -> str:
    return "added" if key not in old else "removed" if key not in new else "changed"


def diff_plans(old: Plan, new: Plan, failed: set[str] | frozenset[str] = frozenset()) -> Diff:
    """What turns the running `old` plan into `new`. `failed`: services the supervisor gave up on, which are
    started again even when unchanged."""
    diff = Diff()
    running = {s.name: s for s in old.services}
    wanted = {s.name: s for s in new.services}
    for spec in new.services:
        before = running.get(spec.name)
        if before is None:
            diff.changes.append(Change(spec.name, spec.role, Action.START, ("new in stack.toml",)))
            continue
        reasons = spec_changes(
            before, spec, old.secret_digests.get(spec.name) if old.secret_digests else None,
            new.secret_digests.get(spec.name) if old.secret_digests else None,
        )  # fmt: skip
        if spec.name in failed:
            reasons.append("it had failed")
        diff.changes.append(Change(spec.name, spec.role, Action.RESTART if reasons else Action.KEEP, tuple(reasons)))
    for spec in old.services:
        if spec.name not in wanted:
            diff.changes.append(Change(spec.name, spec.role, Action.STOP, ("no longer in stack.toml",)))
    diff.changes.sort(key=lambda c: ROLE_ORDER.index(c.role))
    _explain(old, new, diff)
    return diff


def _explain(old: Plan, new: Plan, diff: Diff) -> None:
    """Notes on what a change means beyond its own service, and changes that cannot be applied live."""
    if old.stack != new.stack:
        diff.blockers.append(
            f"[stack] name changes from {old.stack!r} to {new.stack!r}: that is another stack; "
            "run `llmstack down` with the old file first, then `llmstack up`"
        )
    for key, value in new.policy.model_dump().items():
        before = getattr(old.policy, key)
        if before != value:
            diff.policy_changed = True
            diff.notes.append(f"[stack] {key} {before:g} -> {value:g}: applied live")
    if old.controller_url != new.controller_url:
        diff.notes.append(
            f"the controller's address changes ({old.controller_url} -> {new.controller_url}): every service "
            "that talks to it restarts, which is the same as `llmstack down` then `llmstack up`"
        )
    restarted = set(diff.named(Action.RESTART))
    if "controller" in restarted and old.controller_url == new.controller_url:
        diff.notes.append("the controller restarts: workers register with it again within a heartbeat or two")
    if "api" in restarted:
        diff.notes.append("the API server restarts: its streams are drained first (up to drain_timeout)")
    if old.api_url != new.api_url and new.api_url:
        diff.notes.append(f"clients must use the API server's new address {new.api_url}")


def keep_worker_ports(cfg: StackConfig, specs: list[ServiceSpec], running: Plan) -> list[ServiceSpec]:
    """Workers without a fixed port keep the port they run on, so adding or removing a model entry does not
    shift the counted-up ports of the others (and restart them for nothing). New ones get free ports."""
    auto = {
        name for m, names in zip(cfg.models, worker_service_names(cfg), strict=True) if m.port is None for name in names
    }
    old = {s.name: s.port for s in running.services if s.role == "workers"}
    taken = {s.port for s in specs if s.name not in auto}
    ports: dict[str, int] = {}
    for spec in specs:
        if spec.name in auto and spec.name in old and old[spec.name] not in taken:
            ports[spec.name] = old[spec.name]
            taken.add(old[spec.name])
    for spec in specs:
        if spec.name in auto and spec.name not in ports:
            port = spec.port if spec.port not in taken else FIRST_WORKER_PORT
            while port in taken:
                port += 1
            ports[spec.name] = port
            taken.add(port)
    return [_with_port(s, ports[s.name]) if s.name in ports and ports[s.name] != s.port else s for s in specs]


def _with_port(spec: ServiceSpec, port: int) -> ServiceSpec:
    argv = list(spec.argv)
    i = argv.index("--port")
    argv[i + 1] = str(port)
    own = service_url(spec.host, spec.port)
    url = service_url(spec.host, port) if spec.url == own else spec.url  # a worker_address stays as given
    health = f"{service_url(spec.host, port)}/health"
    return spec.model_copy(update={"argv": argv, "port": port, "url": url, "health_url": health})


# -- the request `up` leaves for the supervisor, and the answer it gets ------------------------------------------
class ReconcileRequest(BaseModel):
    """Written by `up` (mode 0600: it carries the secrets the new plan's services get), read and deleted by the
    supervisor on SIGHUP."""

    id: str
    plan: Plan
    secrets: dict[str, str] = Field(default_factory=dict)
    merge_secrets: bool = Field(False, description="`up --only`: the secrets of the roles not chosen are kept")


class ReconcileResult(BaseModel):
    id: str
    done: bool = False
    started: list[str] = Field(default_factory=list)
    restarted: list[str] = Field(default_factory=list)
    stopped: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict, description="service -> why it is not healthy")
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.done and not self.failed and self.message is None


def request_path(rd: RunDir) -> Path:
    return rd.root / "reconcile.json"


def result_path(rd: RunDir) -> Path:
    return rd.root / "reconcile-result.json"
