"""`llmstack up` when the stack is already running: build the plan stack.toml describes now, show how it differs
from the running one, and (unless `--dry-run`) hand it to the supervisor and report what it did.

The new plan travels as a file in the run directory (mode 0600, with the secrets the services get) and a SIGHUP
to the supervisor; the supervisor answers with `reconcile-result.json`. stack.toml was validated before any of
this, so a malformed file never reaches the running stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
import uuid
from pathlib import Path

from rich.table import Table

from llmstack.common.console import EXIT_CONFIG, EXIT_ENV, EXIT_FAILED, EXIT_OK, console, err, print_error
from llmstack.stack.config import StackConfig
from llmstack.stack.logs import LogFollower
from llmstack.stack.plan import (
    Plan,
    ServiceSpec,
    build_plan,
    build_specs,
    exposure_warnings,
    key_warnings,
    resolve_entry,
    resolve_models,
    runtime_fields,
    stack_secrets,
)
from llmstack.stack.reconcile import (
    ROLE_ORDER,
    Action,
    Change,
    Diff,
    ReconcileRequest,
    ReconcileResult,
    diff_plans,
    keep_worker_ports,
    request_path,
    result_path,
)
from llmstack.stack.rundir import Phase, RunDir, RunState, ServiceState

STYLE = {Action.START: "green", Action.RESTART: "yellow", Action.STOP: "red", Action.KEEP: "dim"}


def reconcile_running(
    cfg: StackConfig,
    roles: list[str],
    rd: RunDir,
    live: RunState | None,
    *,
    dry_run: bool,
    offline: bool,
    only: bool = False,
) -> int:
    """Show the changes stack.toml makes to the running stack, apply them unless `dry_run`; the exit code.
    `only`: `roles` came from --only, so services of the other roles are left as they run. Without a running
    stack (only for `dry_run`): everything would start."""
    if live is None:
        print_fresh(cfg.stack.name, build_specs(cfg, roles, None, rd.root))
        return EXIT_OK
    problem = _not_reconcilable(rd, live)
    if problem:
        print_error(problem)
        return EXIT_ENV
    running = Plan.model_validate_json(rd.plan_path.read_text(encoding="utf-8"))
    try:
        plan, secrets = new_plan(cfg, roles, rd, running, offline=offline, dry_run=dry_run, only=only)
    except Exception as exc:  # downloads and GGUF checks, before anything changes
        from llmstack.services.engines.gguf.header import GGUFError
        from llmstack.stack.models import DownloadError

        if not isinstance(exc, DownloadError | GGUFError):
            raise
        print_error(str(exc))
        return EXIT_FAILED
    diff = diff_plans(running, plan, {r.name for r in live.services if r.state == ServiceState.FAILED})
    print_diff(diff, live.stack)
    if diff.blockers:
        for blocker in diff.blockers:
            print_error(blocker)
        return EXIT_CONFIG
    if dry_run:
        console.print("dry run: nothing was changed", markup=False)
        return EXIT_OK
    if diff.empty:
        console.print(f"the running stack already matches {cfg.source_path}: nothing to do", markup=False)
        return EXIT_OK
    touched = set(diff.named(Action.START, Action.RESTART))
    problems = port_problems(running, [s for s in plan.services if s.name in touched])
    if problems:
        for p in problems:
            print_error(p)
        return EXIT_ENV
    for warning in exposure_warnings(cfg, [s for s in plan.services if s.name in touched], secrets):
        err.print(f"warning: {warning}", markup=False)
    for warning in key_warnings(cfg):
        err.print(f"warning: {warning}", markup=False)
    return send_and_wait(rd, live, plan, secrets, merge_secrets=only)


def _not_reconcilable(rd: RunDir, live: RunState) -> str | None:
    sup = live.supervisor
    if sup is None or not sup.alive():
        return (
            f"stack {live.stack!r} has processes running from {rd.root} but no supervisor to apply changes; "
            "stop it with `llmstack down`, then `llmstack up`"
        )
    if live.phase != Phase.READY:
        return f"stack {live.stack!r} is {live.phase.value}; run `llmstack up` again once it is ready (see status)"
    try:
        raw = rd.plan_path.read_text(encoding="utf-8")
    except OSError:
        return f"no plan.json in {rd.root}: stop the stack with `llmstack down`, then `llmstack up`"
    if '"secret_digests"' not in raw:
        return (
            f"stack {live.stack!r} was started by an llmstack that cannot apply changes while running; "
            "`llmstack down`, then `llmstack up` once"
        )
    return None


def new_plan(
    cfg: StackConfig, roles: list[str], rd: RunDir, running: Plan, *, offline: bool, dry_run: bool, only: bool = False
) -> tuple[Plan, dict[str, str]]:
    """The plan stack.toml describes now, in the running stack's run (same run id, stable worker ports); with
    `only`, the running services of the roles not chosen stay in it as they are."""
    paths = model_paths(cfg, offline=offline, dry_run=dry_run) if "workers" in roles else None
    specs = keep_worker_ports(cfg, build_specs(cfg, roles, paths, rd.root), running)
    secrets = stack_secrets(cfg, rd, roles)  # the running stack has its cluster token already: nothing is written
    if only:
        others = [s for s in running.services if s.role not in roles]
        specs = sorted([*others, *specs], key=lambda s: ROLE_ORDER.index(s.role))
    if "workers" in roles:  # the admin API keeps the address it was opened on
        runtime = {**runtime_fields(cfg, paths, roles), "admin": running.admin}
    else:
        runtime = {"models": running.models, "memory_budget": running.memory_budget, "admin": running.admin}
        runtime["gpu_memory_budget"] = running.gpu_memory_budget
    plan = build_plan(cfg, specs, secrets, run_id=running.run_id, timings=running.timings, runtime=runtime)
    if only:  # their secrets are the supervisor's, not this shell's
        plan.secret_digests.update({s.name: running.secret_digests.get(s.name, {}) for s in others})
    return plan, secrets


def model_paths(cfg: StackConfig, *, offline: bool, dry_run: bool) -> list[Path]:
    """Every model's local path, downloading what is missing; a dry run never downloads (a model that is not
    cached keeps its id, which shows as a changed --model-path)."""
    if not dry_run:
        return resolve_models(cfg, offline=offline)
    from llmstack.stack.models import DownloadError

    out = []
    for m in cfg.models:
        try:
            out.append(resolve_entry(cfg, m, True, False))
        except DownloadError:
            out.append(Path(m.model))
    return out


def port_problems(running: Plan, starting: list[ServiceSpec]) -> list[str]:
    """Ports the services to (re)start need that something outside the stack holds."""
    from llmstack.common.net import check_port_free

    # a port of the running stack is freed before what needs it starts (the new plan never gives one port to two
    # services: the one that held it is stopped or moved first), or it is held by the same service
    ours = {s.port for s in running.services}
    out = []
    for spec in starting:
        if spec.port in ours:
            continue
        try:
            check_port_free(spec.host, spec.port)
        except OSError as exc:
            out.append(f"port {spec.port} ({spec.name}) is already in use: {exc}; stop what uses it or change the port")
    return out


def print_diff(diff: Diff, stack: str) -> None:
    console.print(f"stack {stack!r}: {diff.summary()}", markup=False)
    table = Table()
    for col in ("service", "action", "why"):
        table.add_column(col)
    for c in diff.changes:
        why = "; ".join(c.reasons) if c.action != Action.KEEP else "unchanged"
        table.add_row(c.name, f"[{STYLE[c.action]}]{c.action.value}[/]", why)
    console.print(table)
    for note in diff.notes:
        console.print(f"note: {note}", markup=False)


def send_and_wait(rd: RunDir, live: RunState, plan: Plan, secrets: dict[str, str], *, merge_secrets: bool) -> int:
    """Hand the plan to the supervisor, show its progress, and report the outcome."""
    assert live.supervisor is not None
    lock_file = (rd.root / "reconcile.lock").open("w")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print_error("another `llmstack up` is applying changes to this stack; wait for it to finish")
        return EXIT_ENV
    with lock_file:
        request = ReconcileRequest(id=uuid.uuid4().hex, plan=plan, secrets=secrets, merge_secrets=merge_secrets)
        result_path(rd).unlink(missing_ok=True)
        _write_private(request_path(rd), request.model_dump_json())
        follower = LogFollower({"supervisor": rd.log_path("supervisor")}, from_end=True)
        try:
            live.supervisor.signal(signal.SIGHUP)
            return _wait(rd, live, plan, request.id, follower)
        except KeyboardInterrupt:
            err.print("no longer waiting; the supervisor carries on (see `llmstack status`)", markup=False)
            return 130
        finally:
            request_path(rd).unlink(missing_ok=True)  # never left for a later hangup to apply


def _wait(rd: RunDir, live: RunState, plan: Plan, request_id: str, follower: LogFollower) -> int:
    """Show the supervisor's lines until its result for this request is in; the exit code."""
    assert live.supervisor is not None
    policy = plan.policy
    deadline = time.monotonic() + 3 * (policy.start_timeout + policy.drain_timeout) + 60
    while True:
        for _, line in follower.poll():
            console.print("  " + line.split(" supervisor: ", 1)[-1], markup=False, highlight=False)
        result = _read_result(rd, request_id)
        if result is not None and result.done:
            return report(result)
        if not live.supervisor.alive():
            print_error("the supervisor exited while applying the changes; see `llmstack logs supervisor`")
            return EXIT_FAILED
        if time.monotonic() > deadline:
            print_error("no answer from the supervisor; see `llmstack status` and `llmstack logs supervisor`")
            return EXIT_FAILED
        time.sleep(0.2)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _read_result(rd: RunDir, request_id: str) -> ReconcileResult | None:
    with contextlib.suppress(OSError, ValueError):
        result = ReconcileResult.model_validate_json(result_path(rd).read_text(encoding="utf-8"))
        return result if result.id == request_id else None
    return None


def report(result: ReconcileResult) -> int:
    done = {"started": result.started, "restarted": result.restarted, "stopped": result.stopped}
    parts = [f"{label}: {', '.join(names)}" for label, names in done.items() if names]
    for name, why in result.failed.items():
        print_error(f"{name}: {why}")
    if result.message:
        print_error(result.message)
    if result.ok:
        console.print(f"[green]✓[/] stack.toml applied ({'; '.join(parts) or 'settings only'})")
        return EXIT_OK
    console.print(f"stack.toml applied in part ({'; '.join(parts) or 'nothing'})", markup=False)
    return EXIT_FAILED


def print_fresh(stack: str, specs: list[ServiceSpec]) -> None:
    """`up --dry-run` on a stack that is not running: everything would start."""
    diff = Diff(changes=[Change(s.name, s.role, Action.START, ("not running",)) for s in specs])
    print_diff(diff, stack)
    console.print("dry run: nothing was started", markup=False)
