"""The stack commands: `up`, `down`, `status`, `logs`, `pull` and `config check`.  Thin handlers: the
work lives in `llmstack.stack` (plan, control, status, logs)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from llmstack.cli.common import (
    EXIT_CONFIG,
    EXIT_ENV,
    EXIT_FAILED,
    EXIT_OK,
    ConfigOpt,
    JsonOpt,
    RunDirOpt,
    console,
    err,
    fail,
    load_stack,
)
from llmstack.common.console import print_error
from llmstack.stack.config import DEFAULT_CONFIG, ConfigError, StackConfig, load_config
from llmstack.stack.control import run_supervisor, running_state, start_detached, stop_stack
from llmstack.stack.logs import LogFollower, PrefixPrinter, merge_logs, tail_file
from llmstack.stack.modelinfo import model_lines
from llmstack.stack.packaged import is_packaged
from llmstack.stack.plan import (
    Plan,
    RoleName,
    ServiceSpec,
    build_plan,
    build_specs,
    exposure_warnings,
    is_local_model,
    key_warnings,
    masked_config,
    parallel_problems,
    preflight,
    resolve_models,
    runtime_fields,
    selected_roles,
    stack_secrets,
)
from llmstack.stack.rundir import (
    RunDir,
    run_dir_for,
)
from llmstack.stack.status import status_renderable, status_report


def _run_dir(config: Path, run_dir: Path | None) -> tuple[RunDir, StackConfig | None]:
    """The run directory from --run-dir, else from the stack file (which then must be valid)."""
    if run_dir is not None:
        cfg = None
        with contextlib.suppress(ConfigError):
            cfg = load_config(config) if config.is_file() else None
        return RunDir(run_dir), cfg
    cfg = load_stack(config)
    return RunDir(run_dir_for(cfg)), cfg


UP_EPILOG = """Examples:

  llmstack up                      # foreground; Ctrl-C stops everything

  llmstack up --detach -c examples/two-models.toml

  llmstack up --only workers -c examples/remote-worker.toml   # a second machine: just its workers

  llmstack up --dry-run            # on a running stack: what stack.toml's changes would start/restart/stop

  llmstack up                      # on a running stack: apply them (unchanged services keep running)
"""


def up(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once ready; keep running in the background.")
    ] = False,
    only: Annotated[
        list[RoleName] | None, typer.Option("--only", help="Run only these roles (repeatable).", case_sensitive=False)
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Never touch the network: cached or local models only.")
    ] = False,
    run_dir: RunDirOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would change; do nothing.")] = False,
    foreground_supervisor: Annotated[bool, typer.Option("--foreground-supervisor", hidden=True)] = False,
) -> None:
    """Start the stack: controller, then workers, then the API server, then the web UI, each once healthy.
    On a running stack: start what stack.toml adds, restart what it changes (drained first), stop what it drops."""
    if foreground_supervisor:
        if run_dir is None:
            fail("--foreground-supervisor needs --run-dir", EXIT_CONFIG)
        raise typer.Exit(run_supervisor(RunDir(run_dir), echo=False))
    start_stack(load_stack(config), only, detach=detach, offline=offline, run_dir=run_dir, dry_run=dry_run)


def start_stack(
    cfg: StackConfig,
    only: list[RoleName] | None,
    *,
    detach: bool,
    offline: bool,
    run_dir: Path | None,
    dry_run: bool = False,
) -> None:
    """`up` for a loaded configuration (a stack file, or the one `ray join` builds): on a running stack, apply
    what changed; else checks, then the supervisor."""
    t_begin = time.monotonic()
    rd = RunDir(run_dir) if run_dir else RunDir(run_dir_for(cfg))
    try:
        roles = selected_roles(cfg, only)
        specs = build_specs(cfg, roles, None, rd.root)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    live = running_state(rd)
    if live is not None or dry_run:
        from llmstack.stack.reconcile_request import reconcile_running

        raise typer.Exit(reconcile_running(cfg, roles, rd, live, dry_run=dry_run, offline=offline, only=bool(only)))
    _print_warnings(cfg, rd, roles, specs)  # before any other failure, so they are seen on every attempt
    problems = preflight(cfg, specs)
    if problems:
        for p in problems:
            print_error(p)
        raise typer.Exit(EXIT_ENV)
    rd.create()
    secrets = stack_secrets(cfg, rd, roles)

    timings: dict[str, float] = {"preflight": round(time.monotonic() - t_begin, 3)}
    paths = _models_and_cluster(cfg, roles, offline, timings, secrets.get("RAY_AUTH_TOKEN"))
    specs = build_specs(cfg, roles, paths, rd.root)
    plan = build_plan(
        cfg, specs, secrets, run_id=uuid.uuid4().hex, timings=timings, runtime=runtime_fields(cfg, paths, roles)
    )
    runtime_problems(plan, secrets)
    rd.rotate_logs()
    rd.write_json(rd.plan_path, plan.model_dump())
    if detach:
        raise typer.Exit(start_detached(rd, plan, secrets))
    raise typer.Exit(run_supervisor(rd, echo=True, secrets=secrets))


def _models_and_cluster(
    cfg: StackConfig, roles: list[str], offline: bool, timings: dict[str, float], ray_token: str | None
) -> list[Path] | None:
    """Before anything starts: the models' local paths (downloaded if need be), their parallel sizes checked
    against them, and the Ray head this node joins reachable and on the same versions."""
    paths: list[Path] | None = None
    if "workers" in roles:
        from llmstack.services.engines.gguf.header import GGUFError
        from llmstack.stack.models import DownloadError

        t0 = time.monotonic()
        try:
            paths = resolve_models(cfg, offline=offline)
        except (DownloadError, GGUFError) as exc:
            fail(str(exc), EXIT_FAILED)
        timings["resolve_models"] = round(time.monotonic() - t0, 3)
        problems, notes = parallel_problems(cfg, paths)
        for note in notes:
            err.print(f"note: {note}", markup=False)
        if problems:
            for problem in problems:
                print_error(problem)
            raise typer.Exit(EXIT_CONFIG)
    if "ray" in roles:
        from llmstack.stack.raynode import RayNodeError, check_join

        try:
            check_join(cfg.ray, ray_token, cfg.stack.python)
        except RayNodeError as exc:
            fail(str(exc), EXIT_ENV)
    return paths


def runtime_problems(plan: Plan, secrets: dict[str, str]) -> None:
    """Refuse, before anything starts, models loaded at start that overflow the memory budget, and an admin
    key that cannot be had or that is also a /v1 key."""
    from llmstack.stack.admin import AdminKeyError, admin_key_of_env
    from llmstack.stack.budget import Budget, start_problems

    always = [(m.name, m.memory_bytes or (m.estimate.host_bytes if m.estimate else 0)) for m in plan.models]
    always = [pair for pair, m in zip(always, plan.models, strict=True) if m.load == "always"]
    problems = start_problems(always, Budget(plan.memory_budget, plan.gpu_memory_budget))
    try:
        admin_key_of_env(plan.admin.key_env, secrets)
    except AdminKeyError as exc:
        problems.append(str(exc))
    for problem in problems:
        print_error(problem)
    if problems:
        raise typer.Exit(EXIT_CONFIG)


def _print_warnings(cfg: StackConfig, rd: RunDir, roles: list[str], specs: list[ServiceSpec]) -> None:
    planned = stack_secrets(cfg, rd, roles, generate=False)
    warnings = exposure_warnings(cfg, specs, planned)
    if warnings:
        err.print(Panel("\n".join(warnings), title="[bold]exposed without protection[/]", border_style="bold red"))
    for warning in key_warnings(cfg):
        err.print(f"warning: {warning}", markup=False)
    if "workers" in roles and not cfg.controller.local and "LLMSTACK_CLUSTER_TOKEN" not in planned:
        err.print(
            "note: no cluster token set; if the remote controller requires one, set LLMSTACK_CLUSTER_TOKEN",
            markup=False,
        )


def down(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Seconds to drain in-flight requests (default: [stack] drain_timeout)."),
    ] = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Stop the stack: drain in-flight requests, then end every process tree (even without a supervisor)."""
    rd, cfg = _run_dir(config, run_dir)
    drain = timeout if timeout is not None else (cfg.stack.drain_timeout if cfg else 30.0)
    raise typer.Exit(stop_stack(rd, cfg, drain))


def status(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    as_json: JsonOpt = False,
    run_dir: RunDirOpt = None,
    watch: Annotated[
        float | None,
        typer.Option("--watch", "-w", help="Refresh in place every N seconds (Ctrl-C to leave).", min=0.2),
    ] = None,
) -> None:
    """Show every service (state, pid, uptime, restarts, address, health) and every model (workers, queue,
    running, tokens/s, TTFT p50, memory). Exit code 0 only when every service is healthy and supervised;
    1 otherwise; 3 when the stack is not running.

    Examples: `llmstack status`, `llmstack status --json`, `llmstack status --watch 2`."""
    rd, cfg = _run_dir(config, run_dir)
    state = rd.read_state()
    if state is None:
        if as_json:
            console.print_json(json.dumps({"running": False, "run_dir": str(rd.root), "healthy": False}))
        else:
            console.print(f"not running: no stack state in {rd.root}")
        raise typer.Exit(EXIT_ENV)
    if watch is not None and not as_json:
        from rich.live import Live

        with contextlib.suppress(KeyboardInterrupt), Live(console=console, auto_refresh=False) as live:
            while True:
                state = rd.read_state() or state
                live.update(status_renderable(status_report(cfg, rd, state)), refresh=True)
                time.sleep(watch)
        raise typer.Exit(EXIT_OK)
    report = status_report(cfg, rd, state)
    if as_json:
        console.print_json(json.dumps(report))
    else:
        console.print(status_renderable(report))
    if not report["running"]:
        raise typer.Exit(EXIT_ENV)
    raise typer.Exit(EXIT_OK if report["healthy"] else EXIT_FAILED)


def logs(
    service: Annotated[
        str | None,
        typer.Argument(help="A service (api, controller, worker-...), a role (workers) or supervisor; default: all."),
    ] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines per service to show first.")] = 50,
    no_prefix: Annotated[bool, typer.Option("--no-prefix", help="Plain lines, no service prefix.")] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Show (and follow) service logs, interleaved by time with coloured service prefixes.

    Examples: `llmstack logs`, `llmstack logs api -f`, `llmstack logs workers -n 200`."""
    rd, _ = _run_dir(config, run_dir)
    state = rd.read_state()
    paths: dict[str, Path] = {}
    roles: dict[str, str] = {}
    if state is not None:
        for rec in state.services:
            paths[rec.name] = Path(rec.log_path)
            roles[rec.name] = rec.role
    for log in sorted(rd.logs.glob("*.log")) if rd.logs.is_dir() else []:
        paths.setdefault(log.stem, log)
    if not paths:
        fail(f"no logs in {rd.logs}", EXIT_ENV)
    if service is not None:
        picked = {n: p for n, p in paths.items() if n == service or roles.get(n) == service}
        if not picked:
            fail(f"no service {service!r}; known: {', '.join(paths)}", EXIT_CONFIG)
        paths = picked
    printer = PrefixPrinter(paths, console)
    show = (lambda name, line: console.print(line, markup=False, highlight=False)) if no_prefix else printer
    tails = {n: tail_file(p, lines).splitlines() if lines > 0 else [] for n, p in paths.items()}
    for name, line in merge_logs(tails):
        show(name, line)
    if not follow:
        return
    follower = LogFollower(dict(paths), from_end=True)
    try:
        while True:
            for name, line in follower.poll():
                show(name, line)
            time.sleep(0.2)
    except KeyboardInterrupt:
        return


def pull(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model (id or served name).")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Only check the cache; never touch the network.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Ask the hub for changed files even when cached.")] = False,
) -> None:
    """Download every model of the stack (or one) without starting anything.

    Example: `llmstack pull -c examples/baichuan2-13b-8bit.toml`"""
    from llmstack.services.engines.gguf.header import GGUFError
    from llmstack.stack.models import DownloadError

    cfg = load_stack(config)
    if model is not None and not any(model in (m.model, *m.served_names) for m in cfg.models):
        fail(f"no model {model!r} in {config}", EXIT_CONFIG)
    if not cfg.models:
        console.print("no [[models]] in the stack file: nothing to pull", markup=False)
        return
    try:
        paths = resolve_models(cfg, offline=offline, refresh=refresh, only=model)
    except (DownloadError, GGUFError) as exc:
        fail(str(exc), EXIT_FAILED)
    picked = [m for m in cfg.models if model is None or model in (m.model, *m.served_names)]
    for m, path in zip(picked, paths, strict=True):
        console.print(f"[green]✓[/] {m.model} -> {path}")


config_app = typer.Typer(help="Inspect stack files.", no_args_is_help=True)


@config_app.command("check", epilog="Example: llmstack config check -c examples/two-models.toml --json")
def config_check(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    as_json: JsonOpt = False,
) -> None:
    """Validate a stack file and print the resolved configuration (ports assigned, commands to run) and what
    each model will load (file, architecture, quantisation, size, chat template, stop tokens), found without
    downloading or loading weights. Exit code 0 when valid, 2 when not (also for a model that is missing or
    that its engine cannot load)."""
    from llmstack.stack.modelinfo import describe_models

    cfg = load_stack(config)
    roles = selected_roles(cfg, None)
    specs = build_specs(cfg, roles, None)
    reports = describe_models(cfg)
    unusable = [r for r in reports if r.state == "unusable"]
    resolved = {
        "config": str(cfg.source_path),
        "run_dir": str(run_dir_for(cfg)),
        **masked_config(cfg),
        "warnings": key_warnings(cfg),
        "services": [
            {
                "name": s.name,
                "role": s.role,
                "address": s.url,
                "port": s.port,
                "health": s.health_url,
                "models": s.models,
                "command": s.argv[1:],
            }
            for s in specs
        ],
        "loads": [r.model_dump(mode="json") for r in reports],
    }
    if as_json:
        console.print_json(json.dumps(resolved))
        raise typer.Exit(EXIT_CONFIG if unusable else EXIT_OK)
    console.print(f"[green]✓[/] {cfg.source_path} is valid (stack {cfg.stack.name!r}, run dir {resolved['run_dir']})")
    for warning in key_warnings(cfg):
        err.print(f"warning: {warning}", markup=False)
    t = Table(title="services", title_justify="left")
    for col in ("service", "address", "health check", "models"):
        t.add_column(col)
    for s in specs:
        t.add_row(s.name, s.url, s.health_url, ", ".join(s.models))
    console.print(t)
    console.print("commands (secrets travel in the environment, not here):")
    for s in specs:
        shown = s.argv if s.role == "ray" else ["llmstack", *s.argv[3:]]  # the others run `python -m llmstack`
        console.print(f"  {s.name}: {' '.join(shown)}", markup=False, soft_wrap=True)
    for m, report in zip(cfg.models, reports, strict=True):
        where = (
            "pypi package" if is_packaged(m.model) else "local" if is_local_model(cfg, m.model, m.source) else m.source
        )
        console.print(
            f"model {m.model} ({where}, backend {m.backend}, device {m.device}) as {', '.join(m.served_names)}: "
            f"{report.state}",
            markup=False,
        )
        for label, value in model_lines(report):
            console.print(f"  {label:<13}{value}", markup=False, soft_wrap=True)
    for report in unusable:
        print_error(f"model {report.model}: {report.detail}")
    if unusable:
        raise typer.Exit(EXIT_CONFIG)


def register(app: typer.Typer) -> None:
    """Add the stack commands to the main `llmstack` app."""
    app.command(epilog=UP_EPILOG)(up)
    app.command(epilog="Example: llmstack down --timeout 10")(down)
    app.command(epilog="Example: llmstack status --json | jq .healthy")(status)
    app.command()(logs)
    app.command()(pull)
    app.add_typer(config_app, name="config")
