"""Stack lifecycle commands: `up`, `down`, `status`, `logs`, `pull` and `config check`.

Exit codes (all commands): 0 success / healthy; 1 a start, download or health failure; 2 an invalid
stack.toml or usage; 3 the machine is not ready for it (port in use, stack already running, not running).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .config import DEFAULT_CONFIG, ConfigError, StackConfig, load_config
from .runstate import (
    RUN_ID_ENV,
    Phase,
    RunDir,
    RunState,
    ServiceState,
    kill_all,
    marked_processes,
    run_dir_for,
)
from .supervisor import (
    STOP_TIERS,
    LogFollower,
    Plan,
    Policy,
    PrefixPrinter,
    RecordedStop,
    ServiceSpec,
    stop_tiers,
    supervisor_argv,
    tail_file,
)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_ENV = 0, 1, 2, 3


def _console(stderr: bool = False) -> Console:
    """Rich output; when piped (CI logs, scripts) wide enough that tables and URLs are not cut."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, highlight=False, width=width)


console = _console()
err = _console(stderr=True)


class RoleName(enum.StrEnum):
    controller = "controller"
    workers = "workers"
    api = "api"
    webui = "webui"


# -- shared options (defined once) ------------------------------------------------------------------------
ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", envvar="LLMSTACK_CONFIG", help="The stack file.", show_default=True)
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", help="Run directory (default: from the stack file, else ~/.llmstack/<name>)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _error(message: str) -> None:
    """One error on stderr: `error: ...` (red on a terminal), the message verbatim (it may quote logs)."""
    from rich.text import Text

    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def _fail(message: str, code: int) -> typer.Exit:
    _error(message)
    return typer.Exit(code)


def _load(config: Path) -> StackConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_CONFIG) from None


def _run_dir(config: Path, run_dir: Path | None) -> tuple[RunDir, StackConfig | None]:
    """The run directory from --run-dir, else from the stack file (which then must be valid)."""
    if run_dir is not None:
        cfg = None
        with contextlib.suppress(ConfigError):
            cfg = load_config(config) if config.is_file() else None
        return RunDir(run_dir), cfg
    cfg = _load(config)
    return RunDir(run_dir_for(cfg)), cfg


# -- from config to plan ------------------------------------------------------------------------------------
def _python(cfg: StackConfig) -> str:
    return cfg.stack.python or sys.executable


def _worker_names(cfg: StackConfig) -> list[list[str]]:
    """Service names per model entry and replica: `worker-<first served name>[-<i>]`, made unique."""
    out: list[list[str]] = []
    used: set[str] = set()
    for m in cfg.models:
        base = "worker-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in m.served_names[0])
        names = []
        for i in range(m.replicas):
            name = base if m.replicas == 1 else f"{base}-{i}"
            while name in used:
                name += "_"
            used.add(name)
            names.append(name)
        out.append(names)
    return out


def _local_model(cfg: StackConfig, model: str, source: str) -> bool:
    return source == "local" or model.startswith(("/", "./", "../", "~"))


def resolve_models(
    cfg: StackConfig, *, offline: bool = False, refresh: bool = False, only: str | None = None
) -> list[Path]:
    """Local directories for every model (downloading what is not cached, with progress)."""
    from .download import resolve_model

    paths = []
    for m in cfg.models:
        if only is not None and only not in (m.model, *m.served_names):
            continue
        if _local_model(cfg, m.model, m.source):
            paths.append(resolve_model(str(cfg.resolve_path(m.model))))
            continue
        cache = cfg.resolve_path(m.cache_dir) if m.cache_dir else None
        cached = _cached_modelscope_snapshot(m.model, cache, m.revision) if m.source == "modelscope" else None
        if cached is not None and not refresh:
            paths.append(cached)
            continue
        paths.append(
            resolve_model(
                m.model,
                source=m.source,
                revision=m.revision,
                cache_dir=cache,  # type: ignore[arg-type]
                offline=offline,
                refresh=refresh,
                progress=True,
            )
        )
    return paths


def _cached_modelscope_snapshot(model: str, cache: Path | None, revision: str | None) -> Path | None:
    """The snapshot at ModelScope's current cache location, if complete: a start from cache then costs no
    `import modelscope` (about 2 s). Anything else (legacy layouts, downloads) goes through resolve_model."""
    from .download import DownloadError, modelscope_cache_path, resolve_model

    try:
        snapshot = modelscope_cache_path(model, cache, revision)
        return resolve_model(str(snapshot)) if snapshot.is_dir() else None
    except DownloadError:
        return None


def _url(host: str, port: int, tls: bool = False) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def selected_roles(cfg: StackConfig, only: list[RoleName] | None) -> list[str]:
    """The roles this machine runs: `--only`, else everything the file enables."""
    available = {
        "controller": cfg.controller.local,
        "workers": bool(cfg.models),
        "api": cfg.api.enabled,
        "webui": cfg.webui.enabled,
    }
    wanted = [r.value for r in only] if only else [r for r, on in available.items() if on]
    missing = [r for r in wanted if not available[r]]
    if missing:
        why = {
            "controller": "[controller] is disabled or points at a remote address",
            "workers": "there are no [[models]]",
            "api": "[api] enabled = false",
            "webui": "[webui] enabled = false",
        }
        raise ConfigError("; ".join(f"--only {r}: {why[r]}" for r in missing))
    return [r for r in ("controller", "workers", "api", "webui") if r in wanted]


def build_specs(cfg: StackConfig, roles: list[str], model_paths: list[Path] | None) -> list[ServiceSpec]:
    """Command lines, ports and health URLs of the services; `model_paths=None` shows model ids instead."""
    py = [_python(cfg), "-m", "llmstack"]
    controller_url = cfg.controller.url
    drain = ["--drain-timeout", f"{cfg.stack.drain_timeout:g}"]
    specs: list[ServiceSpec] = []
    if "controller" in roles:
        c = cfg.controller
        url = _url(c.host, c.port, bool(c.ssl.certfile))
        specs.append(
            ServiceSpec(
                name="controller",
                role="controller",
                argv=[*py, "controller", *c.args()],
                host=c.host,
                port=c.port,
                url=url,
                health_url=f"{url}/health",
                secret_env=["LLMSTACK_CLUSTER_TOKEN"],
            )
        )
    served: list[str] = []
    if "workers" in roles:
        for i, (m, ports, names) in enumerate(zip(cfg.models, cfg.worker_ports(), _worker_names(cfg), strict=True)):
            path = str(model_paths[i]) if model_paths is not None else m.model
            for port, name in zip(ports, names, strict=True):
                url = _url(m.host, port)
                specs.append(
                    ServiceSpec(
                        name=name,
                        role="workers",
                        argv=[*py, "worker", *m.args(path, port, controller_url), *drain],
                        env=dict(m.env),
                        host=m.host,
                        port=port,
                        url=m.worker_address or url,
                        health_url=f"{url}/health",
                        models=m.served_names,
                        secret_env=["LLMSTACK_CLUSTER_TOKEN"],
                    )
                )
            served += m.served_names
    if "api" in roles:
        a = cfg.api
        url = _url(a.host, a.port, bool(a.ssl.certfile))
        specs.append(
            ServiceSpec(
                name="api",
                role="api",
                argv=[*py, "api", *a.args(controller_url), *drain],
                host=a.host,
                port=a.port,
                url=url,
                health_url=f"{url}/health",
                expect_models=served,
                secret_env=["LLMSTACK_CLUSTER_TOKEN", "LLMSTACK_API_KEYS"],
            )
        )
    if "webui" in roles:
        w = cfg.webui
        url = _url(w.host, w.port)
        argv = [*py, "webui", "--host", w.host, "--port", str(w.port), "--api-url", cfg.api.url, "--title", w.title]
        if cfg.source_path is not None:
            argv += ["--config", str(cfg.source_path)]
        specs.append(
            ServiceSpec(
                name="webui",
                role="webui",
                argv=argv,
                host=w.host,
                port=w.port,
                url=url,
                health_url=f"{url}/",
                secret_env=["LLMSTACK_API_KEY", "LLMSTACK_WEBUI_AUTH"],
            )
        )
    return specs


def _policy(cfg: StackConfig) -> Policy:
    s = cfg.stack
    return Policy(
        start_timeout=s.start_timeout,
        restart_backoff=s.restart_backoff,
        restart_backoff_max=s.restart_backoff_max,
        crash_loop_restarts=s.crash_loop_restarts,
        crash_loop_window=s.crash_loop_window,
        drain_timeout=s.drain_timeout,
    )


def stack_secrets(cfg: StackConfig, rd: RunDir, roles: list[str], *, generate: bool = True) -> dict[str, str]:
    """Secrets for the children (environment, never argv). The cluster token: $LLMSTACK_CLUSTER_TOKEN, else
    `[stack] cluster_token`, else one generated into the run directory when this machine runs the controller
    (`generate=False`: only say that there will be one)."""
    out: dict[str, str] = {}
    token = os.environ.get("LLMSTACK_CLUSTER_TOKEN") or cfg.stack.cluster_token
    if not token and cfg.controller.local:
        token = rd.cluster_token() if generate else "<generated>"
    if token:
        out["LLMSTACK_CLUSTER_TOKEN"] = token
    keys = cfg.api.api_keys or [k for k in os.environ.get("LLMSTACK_API_KEYS", "").split(",") if k.strip()]
    if keys:
        out["LLMSTACK_API_KEYS"] = ",".join(keys)
        out["LLMSTACK_API_KEY"] = keys[0]
    elif os.environ.get("LLMSTACK_API_KEY"):
        out["LLMSTACK_API_KEY"] = os.environ["LLMSTACK_API_KEY"]
    auth = ",".join(cfg.webui.auth) or os.environ.get("LLMSTACK_WEBUI_AUTH", "")
    if auth:
        out["LLMSTACK_WEBUI_AUTH"] = auth
    return out


def _read_token(cfg: StackConfig | None, rd: RunDir) -> str | None:
    return os.environ.get("LLMSTACK_CLUSTER_TOKEN") or (cfg.stack.cluster_token if cfg else None) or rd.stored_token()


# -- preflight ---------------------------------------------------------------------------------------------------
def preflight(cfg: StackConfig, specs: list[ServiceSpec]) -> list[str]:
    """Problems that would make a service fail at once: each names the service and what to change."""
    from .service import check_port_free

    problems = []
    for spec in specs:
        try:
            check_port_free(spec.host, spec.port)
        except OSError as exc:
            problems.append(
                f"port {spec.port} ({spec.name}) is already in use: {exc}; stop what uses it or "
                f"change the port in {cfg.source_path or DEFAULT_CONFIG}"
            )
    return problems


def exposure_warnings(cfg: StackConfig, specs: list[ServiceSpec], secrets: dict[str, str]) -> list[str]:
    from .service import is_loopback

    out = []
    for spec in specs:
        if is_loopback(spec.host):
            continue
        where = f"{spec.name} listens on {spec.host}:{spec.port}"
        if spec.role == "api" and not secrets.get("LLMSTACK_API_KEYS"):
            out.append(f"{where} without API keys: anyone who can reach it can use your models ([api] api_keys)")
        elif spec.role == "controller" and not secrets.get("LLMSTACK_CLUSTER_TOKEN"):
            out.append(f"{where} without a cluster token: anyone can register workers")
        elif spec.role == "workers":
            out.append(f"{where}: workers do not authenticate requests; firewall the port to the API server")
        elif spec.role == "webui" and not secrets.get("LLMSTACK_WEBUI_AUTH"):
            out.append(f"{where} without logins: anyone who can reach it can chat ([webui] auth)")
    return out


def _running_state(rd: RunDir) -> RunState | None:
    """The state of a stack that still has live processes in this run directory, if any."""
    state = rd.read_state()
    if state is None:
        return None
    refs = [state.supervisor] if state.supervisor else []
    refs += [s.proc for s in state.services if s.proc]
    if any(ref.alive() for ref in refs if ref.pid != os.getpid()):
        return state
    return None


# -- up -------------------------------------------------------------------------------------------------------------
UP_EPILOG = """Examples:

  llmstack up                      # foreground; Ctrl-C stops everything

  llmstack up --detach -c examples/two-models.toml

  llmstack up --only workers -c examples/remote-worker.toml   # a second machine: just its workers
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
    foreground_supervisor: Annotated[bool, typer.Option("--foreground-supervisor", hidden=True)] = False,
) -> None:
    """Start the stack: controller, then workers, then the API server, then the web UI, each once healthy."""
    if foreground_supervisor:
        if run_dir is None:
            raise _fail("--foreground-supervisor needs --run-dir", EXIT_CONFIG)
        raise typer.Exit(_supervise(RunDir(run_dir), echo=False))
    t_begin = time.monotonic()
    cfg = _load(config)
    try:
        roles = selected_roles(cfg, only)
    except ConfigError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None
    rd = RunDir(run_dir) if run_dir else RunDir(run_dir_for(cfg))
    live = _running_state(rd)
    if live is not None:
        raise _fail(
            f"stack {live.stack!r} is already running from {rd.root} (see `llmstack status`); "
            "stop it first with `llmstack down`",
            EXIT_ENV,
        )
    specs = build_specs(cfg, roles, None)
    planned = stack_secrets(cfg, rd, roles, generate=False)
    warnings = exposure_warnings(cfg, specs, planned)
    if warnings:  # before any other failure, so they are seen on every attempt
        err.print(Panel("\n".join(warnings), title="[bold]exposed without protection[/]", border_style="bold red"))
    if "workers" in roles and not cfg.controller.local and "LLMSTACK_CLUSTER_TOKEN" not in planned:
        err.print(
            "note: no cluster token set; if the remote controller requires one, set LLMSTACK_CLUSTER_TOKEN",
            markup=False,
        )
    problems = preflight(cfg, specs)
    if problems:
        for p in problems:
            _error(p)
        raise typer.Exit(EXIT_ENV)
    rd.create()
    secrets = stack_secrets(cfg, rd, roles)

    timings: dict[str, float] = {"preflight": round(time.monotonic() - t_begin, 3)}
    paths: list[Path] | None = None
    if "workers" in roles:
        from .download import DownloadError

        t0 = time.monotonic()
        try:
            paths = resolve_models(cfg, offline=offline)
        except DownloadError as exc:
            raise _fail(str(exc), EXIT_FAILED) from None
        timings["resolve_models"] = round(time.monotonic() - t0, 3)
    specs = build_specs(cfg, roles, paths)
    plan = Plan(
        stack=cfg.stack.name,
        config_path=str(cfg.source_path) if cfg.source_path else None,
        run_id=uuid.uuid4().hex,
        policy=_policy(cfg),
        services=specs,
        api_url=cfg.api.url if cfg.api.enabled else None,
        controller_url=cfg.controller.url,
        timings=timings,
    )
    rd.rotate_logs()
    rd.write_json(rd.plan_path, plan.model_dump())
    if detach:
        raise typer.Exit(_detach(rd, plan, secrets))
    raise typer.Exit(_supervise(rd, echo=True, secrets=secrets))


def _supervise(rd: RunDir, *, echo: bool, secrets: dict[str, str] | None = None) -> int:
    """Run the supervisor in this process until stopped (foreground `up`, or the detached supervisor)."""
    from .supervisor import ForegroundEcho, Supervisor, install_signal_handlers

    plan = Plan.model_validate_json(rd.plan_path.read_text(encoding="utf-8"))
    if secrets is None:
        from .supervisor import SECRET_ENV

        secrets = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    printer = None
    if echo:
        names = ["supervisor", *(s.name for s in plan.services)]
        printer = PrefixPrinter(names, console)
        follower = LogFollower({s.name: rd.log_path(s.name) for s in plan.services}, from_end=False)
        sup = Supervisor(plan, rd, secrets=secrets, echo=ForegroundEcho(printer, follower))
    else:
        sup = Supervisor(plan, rd, secrets=secrets)
    install_signal_handlers(sup)
    has_keys = "LLMSTACK_API_KEYS" in secrets
    code = sup.run(on_ready=(lambda s: _print_ready(s.state, plan, has_keys)) if echo else None)
    if echo and sup.state.phase == Phase.FAILED:
        _error(str(sup.state.message))
    return code


def _detach(rd: RunDir, plan: Plan, secrets: dict[str, str]) -> int:
    """Start the supervisor as its own background process and wait until the stack is ready or failed."""
    env = {**os.environ, **secrets, RUN_ID_ENV: plan.run_id}
    rd.logs.mkdir(parents=True, exist_ok=True)
    with rd.log_path("supervisor").open("ab") as out:
        proc = subprocess.Popen(
            supervisor_argv(rd.root),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    shown: set[str] = set()
    try:
        while True:
            state = rd.read_state()
            if state is not None and state.run_id == plan.run_id:
                for rec in state.services:
                    if rec.state == ServiceState.RUNNING and rec.name not in shown:
                        shown.add(rec.name)
                        console.print(f"  [green]✓[/] {rec.name} healthy after {rec.first_ready_after or 0:.1f}s")
                if state.phase == Phase.READY:
                    _print_ready(state, plan, "LLMSTACK_API_KEYS" in secrets)
                    console.print(
                        f"running in the background (supervisor pid {proc.pid}); stop with "
                        f"[bold]llmstack down[/]{_config_hint(plan)}"
                    )
                    return EXIT_OK
                if state.phase in (Phase.FAILED, Phase.STOPPED) and proc.poll() is not None:
                    _error(state.message or "the stack stopped while starting")
                    return EXIT_FAILED
            if proc.poll() is not None and (state is None or state.phase not in (Phase.FAILED, Phase.STOPPED)):
                _error(
                    f"the supervisor exited with {proc.returncode} while starting; its log:\n"
                    f"{tail_file(rd.log_path('supervisor'), 30)}"
                )
                _down(rd, None, plan.policy.drain_timeout, quiet=True)
                return EXIT_FAILED
            time.sleep(0.2)
    except KeyboardInterrupt:
        err.print("interrupted: stopping what was started", markup=False)
        _down(rd, None, 5.0, quiet=True)
        return 130


def _config_hint(plan: Plan) -> str:
    if plan.config_path and Path(plan.config_path) != Path(DEFAULT_CONFIG).resolve():
        return f" -c {_rel(plan.config_path)}"
    return ""


def _rel(path: str) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(Path.cwd()))
    return path


def _print_ready(state: RunState, plan: Plan, has_keys: bool) -> None:
    table = Table(title=f"stack {state.stack!r} is ready", title_justify="left")
    for col in ("service", "address", "pid", "ready in", "models"):
        table.add_column(col)
    for rec in state.services:
        table.add_row(
            rec.name,
            rec.url,
            str(rec.proc.pid if rec.proc else "-"),
            f"{rec.first_ready_after:.1f}s" if rec.first_ready_after is not None else "-",
            ", ".join(rec.models),
        )
    console.print(table)
    models = [m for rec in state.services for m in rec.models]
    if plan.api_url and any(s.role == "api" for s in plan.services):
        model = models[0] if models else "<model>"
        auth = ' -H "Authorization: Bearer $LLMSTACK_API_KEY"' if has_keys else ""
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
        key = "os.environ['LLMSTACK_API_KEY']" if auth else "'none'"
        console.print("Try it:", style="bold")
        console.print(
            f"  curl {plan.api_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
            markup=False,
            soft_wrap=True,
        )
        console.print(
            f"  python -c \"import os; from openai import OpenAI; c = OpenAI(base_url='{plan.api_url}/v1', "
            f"api_key={key}); print(c.chat.completions.create(model='{model}', "
            "messages=[{'role': 'user', 'content': 'Hello!'}]).choices[0].message.content)\"",
            markup=False,
            soft_wrap=True,
        )
    webui = next((s for s in plan.services if s.role == "webui"), None)
    if webui is not None:
        console.print(f"  web UI: {webui.url}", markup=False)


# -- down -------------------------------------------------------------------------------------------------------
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
    raise typer.Exit(_down(rd, cfg, drain))


def _down(rd: RunDir, cfg: StackConfig | None, drain: float, *, quiet: bool = False) -> int:
    state = rd.read_state()
    if state is None:
        if not quiet:
            console.print(f"nothing to stop: no stack state in {rd.root}")
        return EXIT_OK
    sup = state.supervisor
    if sup is not None and sup.pid != os.getpid() and sup.alive():
        if not quiet:
            console.print(f"stopping supervisor (pid {sup.pid}); draining for up to {drain:g}s")
        sup.signal(signal.SIGTERM)  # it drains its services in order
        deadline = time.monotonic() + drain * 3 + 15
        while sup.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        state = rd.read_state() or state
    # whatever is left: the supervisor was killed, hung, or gave up
    tiers = [
        [RecordedStop(s.name, s.proc) for s in state.services if s.role in tier and s.proc is not None]
        for tier in STOP_TIERS
    ]
    live = [p.name for tier in tiers for p in tier if p.alive()]
    if live and not quiet:
        console.print(f"stopping {', '.join(live)} (no supervisor); draining for up to {drain:g}s")
    stop_tiers(tiers, drain if live else 0.0)
    if sup is not None and sup.pid != os.getpid():
        sup.kill_tree()
    stragglers = marked_processes(state.run_id)
    if stragglers:
        kill_all(stragglers)
        with contextlib.suppress(Exception):
            import psutil

            psutil.wait_procs(stragglers, timeout=5)
    for rec in state.services:
        if rec.state != ServiceState.FAILED:
            rec.state = ServiceState.STOPPED
    state.phase = Phase.STOPPED
    rd.write_state(state)
    if not quiet:
        extra = f" ({len(stragglers)} stray processes killed)" if stragglers else ""
        console.print(f"stack {state.stack!r} stopped{extra}")
    return EXIT_OK


# -- status ---------------------------------------------------------------------------------------------------
def _health(rec: Any) -> tuple[bool, str]:
    import httpx

    try:
        with httpx.Client(timeout=2.0, trust_env=False, verify=False) as client:
            resp = client.get(rec.health_url)
    except httpx.HTTPError as exc:
        return False, type(exc).__name__
    if resp.status_code != 200:
        return False, f"HTTP {resp.status_code}"
    if rec.role == "workers":
        with contextlib.suppress(ValueError):
            status = resp.json().get("status")
            return status == "ok", str(status)
        return False, "bad reply"
    return True, "ok"


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _models_from_controller(url: str | None, token: str | None, state: RunState) -> tuple[list[dict], str | None]:
    import httpx

    if not url:
        return [], None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(timeout=3.0, trust_env=not url.startswith(("http://127.", "http://localhost"))) as client:
            resp = client.get(f"{url}/workers", headers=headers)
            resp.raise_for_status()
            table = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        return [], f"controller {url}: {type(exc).__name__}: {exc}"
    memory: dict[str, int] = {}
    for rec in state.services:
        if rec.role == "workers" and rec.proc is not None:
            total = 0
            for proc in rec.proc.members():
                with contextlib.suppress(Exception):
                    total += proc.memory_info().rss
            memory[rec.url.rstrip("/")] = total
    models: dict[str, dict] = {}
    for w in table.get("workers", []):
        status = w.get("status", {})
        for name in w.get("model_names", []):
            m = models.setdefault(
                name,
                {
                    "name": name,
                    "workers": 0,
                    "queue_length": 0,
                    "running": 0,
                    "tokens_per_s": 0.0,
                    "memory_bytes": 0,
                    "kind": w.get("kind"),
                },
            )
            m["workers"] += 1
            m["queue_length"] += int(status.get("queue_length", 0))
            m["running"] += int(status.get("running", 0))
            m["tokens_per_s"] += float(status.get("speed", 0.0))
            m["memory_bytes"] += memory.get(str(w.get("worker_address", "")).rstrip("/"), 0)
    return sorted(models.values(), key=lambda m: m["name"]), None


def _ttft_p50(api_url: str | None) -> dict[str, float]:
    """Median time to first token per model, from the API server's histogram (as histogram_quantile)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not api_url:
        return {}
    try:
        with httpx.Client(timeout=2.0, trust_env=False, verify=False) as client:
            text = client.get(f"{api_url}/metrics").text
    except httpx.HTTPError:
        return {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "llmstack_api_time_to_first_token_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.setdefault(sample.labels["model"], []).append((float(sample.labels["le"]), sample.value))
    out = {}
    for model, pairs in buckets.items():
        pairs.sort()
        total = pairs[-1][1] if pairs else 0
        if not total:
            continue
        rank, lower, below = total / 2, 0.0, 0.0
        for upper, count in pairs:
            if count >= rank:
                if upper == float("inf"):
                    out[model] = lower
                else:
                    share = (rank - below) / (count - below) if count > below else 1.0
                    out[model] = lower + (upper - lower) * share
                break
            lower, below = upper, count
    return out


def _status_report(cfg: Any, rd: Any, state: RunState) -> dict:
    now = time.time()
    sup_alive = bool(state.supervisor and state.supervisor.alive())
    services = []
    for rec in state.services:
        alive = bool(rec.proc and rec.proc.alive())
        ok, detail = _health(rec) if alive else (False, "not running")
        shown = rec.state.value
        if rec.state in (ServiceState.RUNNING, ServiceState.RESTARTING, ServiceState.STARTING) and not alive:
            shown = "dead"
        services.append(
            {
                "name": rec.name,
                "role": rec.role,
                "state": shown,
                "pid": rec.proc.pid if rec.proc and alive else None,
                "uptime_s": round(now - rec.ready_at, 1) if alive and rec.ready_at else None,
                "restarts": rec.restarts,
                "address": rec.url,
                "healthy": ok,
                "health": detail,
                "message": rec.message,
                "log_path": rec.log_path,
                "models": rec.models,
            }
        )
    controller_url = state.controller_url
    models, models_error = _models_from_controller(controller_url, _read_token(cfg, rd), state)
    ttft = _ttft_p50(state.api_url)
    for row in models:
        row["ttft_p50_s"] = ttft.get(row["name"])
    running = state.phase not in (Phase.STOPPED,) and any(s["pid"] for s in services)
    healthy = bool(services) and all(s["healthy"] for s in services) and sup_alive
    return {
        "stack": state.stack,
        "run_dir": str(rd.root),
        "phase": state.phase.value,
        "running": running,
        "healthy": healthy,
        "message": state.message,
        "supervisor": {"pid": state.supervisor.pid if state.supervisor else None, "alive": sup_alive},
        "started_at": state.started_at,
        "ready_at": state.ready_at,
        "timings": state.timings,
        "api_url": state.api_url,
        "controller_url": controller_url,
        "services": services,
        "models": models,
        "models_error": models_error,
    }


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
                live.update(_status_renderable(_status_report(cfg, rd, state)), refresh=True)
                time.sleep(watch)
        raise typer.Exit(EXIT_OK)
    report = _status_report(cfg, rd, state)
    if as_json:
        console.print_json(json.dumps(report))
    else:
        console.print(_status_renderable(report))
    if not report["running"]:
        raise typer.Exit(EXIT_ENV)
    raise typer.Exit(EXIT_OK if report["healthy"] else EXIT_FAILED)


def _status_renderable(report: dict) -> Any:
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    sup = report["supervisor"]
    head = f"stack {report['stack']!r}: {report['phase']}"
    head += f", supervisor pid {sup['pid']}" if sup["alive"] else ", [bold red]supervisor not running[/]"
    parts.append(head)
    t = Table(title="services", title_justify="left")
    for col in ("service", "state", "pid", "uptime", "restarts", "address", "health"):
        t.add_column(col)
    for s in report["services"]:
        style = "green" if s["healthy"] else "red"
        t.add_row(
            s["name"],
            s["state"],
            str(s["pid"] or "-"),
            _uptime(s["uptime_s"]),
            str(s["restarts"]),
            s["address"],
            f"[{style}]{s['health']}[/]",
        )
    parts.append(t)
    for s in report["services"]:
        if s["message"]:
            parts.append(Text(f"  {s['name']}: {s['message']}"))
    if report["models"]:
        m = Table(title="models", title_justify="left")
        for col in ("model", "workers", "queue", "running", "tokens/s", "TTFT p50", "memory"):
            m.add_column(col)
        for row in report["models"]:
            mem = f"{row['memory_bytes'] / 2**20:.0f} MiB" if row["memory_bytes"] else "-"
            ttft = row.get("ttft_p50_s")
            m.add_row(
                row["name"],
                str(row["workers"]),
                str(row["queue_length"]),
                str(row["running"]),
                f"{row['tokens_per_s']:.1f}",
                "-" if ttft is None else f"{ttft * 1000:.0f} ms",
                mem,
            )
        parts.append(m)
    elif report["models_error"]:
        parts.append(Text(f"models: unavailable ({report['models_error']})"))
    return Group(*parts)


# -- logs ---------------------------------------------------------------------------------------------------------
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
    from .supervisor import merge_logs

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
        raise _fail(f"no logs in {rd.logs}", EXIT_ENV)
    if service is not None:
        picked = {n: p for n, p in paths.items() if n == service or roles.get(n) == service}
        if not picked:
            raise _fail(f"no service {service!r}; known: {', '.join(paths)}", EXIT_CONFIG)
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


# -- pull -----------------------------------------------------------------------------------------------------------
def pull(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model (id or served name).")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Only check the cache; never touch the network.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Ask the hub for changed files even when cached.")] = False,
) -> None:
    """Download every model of the stack (or one) without starting anything.

    Example: `llmstack pull -c examples/baichuan2-13b-8bit.toml`"""
    from .download import DownloadError

    cfg = _load(config)
    if model is not None and not any(model in (m.model, *m.served_names) for m in cfg.models):
        raise _fail(f"no model {model!r} in {config}", EXIT_CONFIG)
    if not cfg.models:
        console.print("no [[models]] in the stack file: nothing to pull", markup=False)
        return
    try:
        paths = resolve_models(cfg, offline=offline, refresh=refresh, only=model)
    except DownloadError as exc:
        raise _fail(str(exc), EXIT_FAILED) from None
    picked = [m for m in cfg.models if model is None or model in (m.model, *m.served_names)]
    for m, path in zip(picked, paths, strict=True):
        console.print(f"[green]✓[/] {m.model} -> {path}")


# -- config check -------------------------------------------------------------------------------------------------
config_app = typer.Typer(help="Inspect stack files.", no_args_is_help=True)


def _masked(cfg: StackConfig) -> dict:
    data = cfg.model_dump(mode="json")
    if data["stack"].get("cluster_token"):
        data["stack"]["cluster_token"] = "***"
    data["api"]["api_keys"] = ["***" for _ in data["api"]["api_keys"]]
    data["webui"]["auth"] = [a.split(":", 1)[0] + ":***" for a in data["webui"]["auth"]]
    return data


@config_app.command("check", epilog="Example: llmstack config check -c examples/two-models.toml --json")
def config_check(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    as_json: JsonOpt = False,
) -> None:
    """Validate a stack file and print the resolved configuration (ports assigned, commands to run).
    Exit code 0 when valid, 2 when not."""
    cfg = _load(config)
    roles = selected_roles(cfg, None)
    specs = build_specs(cfg, roles, None)
    resolved = {
        "config": str(cfg.source_path),
        "run_dir": str(run_dir_for(cfg)),
        **_masked(cfg),
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
    }
    if as_json:
        console.print_json(json.dumps(resolved))
        return
    console.print(f"[green]✓[/] {cfg.source_path} is valid (stack {cfg.stack.name!r}, run dir {resolved['run_dir']})")
    t = Table(title="services", title_justify="left")
    for col in ("service", "address", "health check", "models"):
        t.add_column(col)
    for s in specs:
        t.add_row(s.name, s.url, s.health_url, ", ".join(s.models))
    console.print(t)
    console.print("commands (secrets travel in the environment, not here):")
    for s in specs:
        console.print(f"  {s.name}: {' '.join(['llmstack', *s.argv[3:]])}", markup=False, soft_wrap=True)
    for m in cfg.models:
        where = "local directory" if _local_model(cfg, m.model, m.source) else f"{m.source}"
        console.print(
            f"  model {m.model} ({where}, backend {m.backend}, device {m.device}) as {', '.join(m.served_names)}",
            markup=False,
        )


def register(app: typer.Typer) -> None:
    """Add the stack commands to the main `llmstack` app."""
    app.command(epilog=UP_EPILOG)(up)
    app.command(epilog="Example: llmstack down --timeout 10")(down)
    app.command(epilog="Example: llmstack status --json | jq .healthy")(status)
    app.command()(logs)
    app.command()(pull)
    app.add_typer(config_app, name="config")


__all__ = ["register", "build_specs", "resolve_models", "selected_roles"]
