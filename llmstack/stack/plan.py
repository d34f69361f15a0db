"""From stack.toml to a plan: which services run, with which command lines, ports, health checks and
secrets, and what would stop them from starting (ports taken, exposure without protection).

The plan is written to the run directory (without secrets) and is all the supervisor reads."""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from llmstack.stack.config import DEFAULT_CONFIG, ConfigError, StackConfig
from llmstack.stack.rundir import (
    Role,
    RunDir,
    run_dir_for,
)

#: Environment variables that carry secrets; children get only those their spec grants.
SECRET_ENV = ("LLMSTACK_CLUSTER_TOKEN", "LLMSTACK_API_KEYS", "LLMSTACK_API_KEY", "LLMSTACK_WEBUI_AUTH")


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


class RoleName(enum.StrEnum):
    controller = "controller"
    workers = "workers"
    api = "api"
    webui = "webui"


def service_python(cfg: StackConfig) -> str:
    return cfg.stack.python or sys.executable


def worker_service_names(cfg: StackConfig) -> list[list[str]]:
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


def is_local_model(cfg: StackConfig, model: str, source: str) -> bool:
    return source == "local" or model.startswith(("/", "./", "../", "~"))


def resolve_models(
    cfg: StackConfig, *, offline: bool = False, refresh: bool = False, only: str | None = None
) -> list[Path]:
    """Local directories for every model (downloading what is not cached, with progress)."""
    from llmstack.stack.models import resolve_model

    paths = []
    for m in cfg.models:
        if only is not None and only not in (m.model, *m.served_names):
            continue
        if is_local_model(cfg, m.model, m.source):
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
    from llmstack.stack.models import DownloadError, modelscope_cache_path, resolve_model

    try:
        snapshot = modelscope_cache_path(model, cache, revision)
        return resolve_model(str(snapshot)) if snapshot.is_dir() else None
    except DownloadError:
        return None


def service_url(host: str, port: int, tls: bool = False) -> str:
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
    py = [service_python(cfg), "-m", "llmstack"]
    controller_url = cfg.controller.url
    drain = ["--drain-timeout", f"{cfg.stack.drain_timeout:g}"]
    specs: list[ServiceSpec] = []
    if "controller" in roles:
        c = cfg.controller
        url = service_url(c.host, c.port, bool(c.ssl.certfile))
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
        entries = zip(cfg.models, cfg.worker_ports(), worker_service_names(cfg), strict=True)
        for i, (m, ports, names) in enumerate(entries):
            path = str(model_paths[i]) if model_paths is not None else m.model
            for port, name in zip(ports, names, strict=True):
                url = service_url(m.host, port)
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
        url = service_url(a.host, a.port, bool(a.ssl.certfile))
        specs.append(
            ServiceSpec(
                name="api",
                role="api",
                argv=[*py, "api", *a.args(controller_url, str(run_dir_for(cfg))), *drain],
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
        url = service_url(w.host, w.port)
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


def policy_of(cfg: StackConfig) -> Policy:
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


def cluster_token_for(cfg: StackConfig | None, rd: RunDir) -> str | None:
    return os.environ.get("LLMSTACK_CLUSTER_TOKEN") or (cfg.stack.cluster_token if cfg else None) or rd.stored_token()


def preflight(cfg: StackConfig, specs: list[ServiceSpec]) -> list[str]:
    """Problems that would make a service fail at once: each names the service and what to change."""
    from llmstack.common.http import check_port_free

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
    from llmstack.common.http import is_loopback

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


def masked_config(cfg: StackConfig) -> dict:
    data = cfg.model_dump(mode="json")
    if data["stack"].get("cluster_token"):
        data["stack"]["cluster_token"] = "***"
    data["api"]["api_keys"] = ["***" for _ in data["api"]["api_keys"]]
    data["webui"]["auth"] = [a.split(":", 1)[0] + ":***" for a in data["webui"]["auth"]]
    return data
