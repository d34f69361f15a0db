"""From stack.toml to a plan: which services run, with which command lines, ports, health checks and
secrets, and what would stop them from starting (ports taken, exposure without protection).

The plan is written to the run directory (without secrets) and is all the supervisor reads."""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llmstack.common.net import service_url
from llmstack.services.engines.gguf.files import is_gguf_path
from llmstack.services.engines.gguf.header import read_header
from llmstack.services.engines.gguf.support import check_servable
from llmstack.stack.config import DEFAULT_CONFIG, ConfigError, ModelSection, StackConfig
from llmstack.stack.footprint import Footprint, estimate
from llmstack.stack.packaged import is_packaged
from llmstack.stack.rundir import (
    Role,
    RunDir,
    run_dir_for,
)

#: Environment variables that carry secrets; children get only those their spec grants.
SECRET_ENV = (
    "LLMSTACK_CLUSTER_TOKEN", "LLMSTACK_API_KEYS", "LLMSTACK_API_KEY_RULES", "LLMSTACK_API_KEY", "LLMSTACK_WEBUI_AUTH",
    "RAY_AUTH_TOKEN",
)  # fmt: skip


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


class ModelPlan(BaseModel):
    """One `[[models]]` entry as the supervisor manages it at run time (its workers are `services`)."""

    name: str
    names: list[str]
    services: list[str]
    load: str = "always"
    keep_alive: float | None = None
    pin: bool = False
    memory_bytes: int | None = Field(None, description="declared footprint; overrides estimate and measurement")
    estimate: Footprint | None = None


class AdminPlan(BaseModel):
    """The supervisor's admin API: where it listens (port None: any free one) and where its key comes from."""

    host: str = "127.0.0.1"
    port: int | None = None
    key_env: str | None = None


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
    models: list[ModelPlan] = Field(default_factory=list, description="what the supervisor loads and unloads")
    memory_budget: int | None = None
    gpu_memory_budget: int | None = None
    admin: AdminPlan = Field(default_factory=lambda: AdminPlan())
    secret_digests: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="per service, a keyed hash of each secret it gets (secret_digests)"
    )


class RoleName(enum.StrEnum):
    ray = "ray"
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
    return source == "local" or model.startswith(("/", "./", "../", "~")) or is_gguf_path(model)


def resolve_models(
    cfg: StackConfig, *, offline: bool = False, refresh: bool = False, only: str | None = None
) -> list[Path]:
    """Local paths for every model (downloading what is not cached, with progress): model directories, or
    the one .gguf file a GGUF model is, checked to be one the model's engine can serve.

    Raises `DownloadError`, or `GGUFError` for a GGUF file (or gguf_file pattern) that cannot work."""
    paths = []
    for m in cfg.models:
        if only is not None and only not in (m.model, *m.served_names):
            continue
        path = resolve_entry(cfg, m, offline, refresh)
        if is_gguf_path(path):
            check_servable(read_header(path), m.backend)
        paths.append(path)
    return paths


def resolve_entry(cfg: StackConfig, m: ModelSection, offline: bool, refresh: bool) -> Path:
    """One `[[models]]` entry's local path: its model directory, or the .gguf file it is or selects."""
    from llmstack.stack.models import resolve_model

    if is_packaged(m.model):
        return resolve_model(m.model)
    if is_local_model(cfg, m.model, m.source):
        return resolve_model(str(cfg.resolve_path(m.model)), gguf_file=m.gguf_file)
    cache = cfg.resolve_path(m.cache_dir) if m.cache_dir else None
    if m.gguf_file is None and m.source == "modelscope" and not refresh:
        cached = _cached_modelscope_snapshot(m.model, cache, m.revision)
        if cached is not None:
            return cached
    return resolve_model(
        m.model,
        source=m.source,
        revision=m.revision,
        cache_dir=cache,  # type: ignore[arg-type]
        offline=offline,
        refresh=refresh,
        progress=True,
        gguf_file=m.gguf_file,
    )


def _cached_modelscope_snapshot(model: str, cache: Path | None, revision: str | None) -> Path | None:
    """The snapshot at ModelScope's current cache location, if complete: a start from cache then costs no
    `import modelscope` (about 2 s). Anything else (legacy layouts, downloads) goes through resolve_model."""
    from llmstack.stack.models import DownloadError, modelscope_cache_path, resolve_model

    try:
        snapshot = modelscope_cache_path(model, cache, revision)
        return resolve_model(str(snapshot)) if snapshot.is_dir() else None
    except DownloadError:
        return None


def selected_roles(cfg: StackConfig, only: list[RoleName] | None) -> list[str]:
    """The roles this machine runs: `--only`, else everything the file enables."""
    available = {
        "ray": cfg.ray.enabled,
        "controller": cfg.controller.local,
        "workers": bool(cfg.models),
        "api": cfg.api.enabled,
        "webui": cfg.webui.enabled,
    }
    wanted = [r.value for r in only] if only else [r for r, on in available.items() if on]
    missing = [r for r in wanted if not available[r]]
    if missing:
        why = {
            "ray": "there is no [ray] section with head = true or an address",
            "controller": "[controller] is disabled or points at a remote address",
            "workers": "there are no [[models]]",
            "api": "[api] enabled = false",
            "webui": "[webui] enabled = false",
        }
        raise ConfigError("; ".join(f"--only {r}: {why[r]}" for r in missing))
    return [r for r in ("ray", "controller", "workers", "api", "webui") if r in wanted]


def build_specs(
    cfg: StackConfig, roles: list[str], model_paths: list[Path] | None, run_dir: Path | None = None
) -> list[ServiceSpec]:
    """Command lines, ports and health URLs of the services; `model_paths=None` shows model ids instead.
    The API server keeps its state (usage) in the run directory (`run_dir`, default from the file)."""
    py = [service_python(cfg), "-m", "llmstack"]
    controller_url = cfg.controller.url
    drain = ["--drain-timeout", f"{cfg.stack.drain_timeout:g}"]
    specs: list[ServiceSpec] = [ray_spec(cfg)] if "ray" in roles else []
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
    workers = worker_specs(cfg, model_paths, [*py, "worker"], drain) if "workers" in roles else []
    specs += workers
    later = {name for m in cfg.models if m.load != "always" for name in m.served_names}
    # the API server is ready without the models that load at run time
    served = list(dict.fromkeys(name for spec in workers for name in spec.models if name not in later))
    if "api" in roles:
        a = cfg.api
        url = service_url(a.host, a.port, bool(a.ssl.certfile))
        state = ["--state-dir", str(run_dir or run_dir_for(cfg))]
        if a.keys_file:
            state += ["--keys-file", str(cfg.resolve_path(a.keys_file))]
        specs.append(
            ServiceSpec(
                name="api",
                role="api",
                argv=[*py, "api", *a.args(controller_url), *state, *drain],
                host=a.host,
                port=a.port,
                url=url,
                health_url=f"{url}/health",
                expect_models=served,
                secret_env=["LLMSTACK_CLUSTER_TOKEN", "LLMSTACK_API_KEYS", "LLMSTACK_API_KEY_RULES"],
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


def worker_specs(
    cfg: StackConfig, model_paths: list[Path] | None, worker_cmd: list[str], drain: list[str]
) -> list[ServiceSpec]:
    """One service per worker port of every `[[models]]` entry (`replicas` gives several)."""
    specs: list[ServiceSpec] = []
    controller_url = cfg.controller.url
    entries = zip(cfg.models, cfg.worker_ports(), worker_service_names(cfg), strict=True)
    for i, (m, ports, names) in enumerate(entries):
        path = str(model_paths[i]) if model_paths is not None else m.model
        for port, name in zip(ports, names, strict=True):
            url = service_url(m.host, port)
            specs.append(
                ServiceSpec(
                    name=name,
                    role="workers",
                    argv=[*worker_cmd, *m.args(path, port, controller_url), *drain],
                    env=worker_env(cfg, m),
                    host=m.host,
                    port=port,
                    url=m.worker_address or url,
                    health_url=f"{url}/health",
                    models=m.served_names,
                    secret_env=["LLMSTACK_CLUSTER_TOKEN", *(["RAY_AUTH_TOKEN"] if over_ray(cfg, m) else [])],
                )
            )
    return specs


def build_plan(
    cfg: StackConfig,
    specs: list[ServiceSpec],
    secrets: dict[str, str],
    *,
    run_id: str,
    timings: dict[str, float],
    runtime: dict[str, Any] | None = None,
) -> Plan:
    """The plan `up` hands the supervisor: for a fresh stack, or the new plan of a running one (same run id).
    `runtime`: the models-at-run-time fields (`runtime_fields`)."""
    return Plan(
        stack=cfg.stack.name,
        config_path=str(cfg.source_path) if cfg.source_path else None,
        run_id=run_id,
        policy=policy_of(cfg),
        services=specs,
        api_url=cfg.api.url if cfg.api.enabled else None,
        controller_url=cfg.controller.url,
        timings=timings,
        secret_digests=secret_digests(specs, secrets, run_id),  # lets a later `up` tell a changed key
        **(runtime or {}),
    )


def secret_digests(specs: list[ServiceSpec], secrets: dict[str, str], salt: str) -> dict[str, dict[str, str]]:
    """Per service, a keyed hash of each secret it is given: enough to tell a changed key from the same one
    without writing any key to disk."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        given = {n: secrets[n] for n in spec.secret_env if secrets.get(n)}
        out[spec.name] = {
            n: hmac.new(salt.encode(), v.encode(), hashlib.sha256).hexdigest()[:32] for n, v in sorted(given.items())
        }
    return out


def ray_spec(cfg: StackConfig) -> ServiceSpec:
    """This host's Ray node (`stack/raynode.py`): the head, or a node joining `[ray] address`."""
    from llmstack.stack.raynode import health_url, node_env, ray_argv, ray_executable

    r = cfg.ray
    temp = cfg.resolve_path(r.temp_dir) if r.temp_dir else None
    try:
        executable = ray_executable(service_python(cfg))
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    return ServiceSpec(
        name="ray-head" if r.head else "ray-node",
        role="ray",
        argv=ray_argv(r, executable, temp),
        env=node_env(r.ip),
        secret_env=["RAY_AUTH_TOKEN"],
        host=r.ip,
        port=r.node_manager_port,
        url=r.head_address if r.head else f"{r.ip} -> {r.head_address}",
        health_url=health_url(r),
    )


def over_ray(cfg: StackConfig, m: ModelSection) -> bool:
    """Whether this model's vLLM runs its ranks on the stack's Ray cluster."""
    from llmstack.services.worker.engine_config import vllm_engine_args

    return cfg.ray.enabled and vllm_engine_args(m).get("distributed_executor_backend") == "ray"


def worker_env(cfg: StackConfig, m: ModelSection) -> dict[str, str]:
    """A worker's environment: its [[models]] env, and when vLLM runs over Ray the cluster's address (else
    vLLM would start a cluster of its own, on this host only) and what the node's processes get."""
    from llmstack.stack.raynode import node_env

    env = dict(m.env)
    if over_ray(cfg, m):
        for name, value in {**node_env(cfg.ray.ip), "RAY_ADDRESS": cfg.ray.head_address}.items():
            env.setdefault(name, value)
    return env


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
    if not token and (cfg.controller.local or cfg.ray.head):
        token = rd.cluster_token() if generate else "<generated>"
    if token:
        out["LLMSTACK_CLUSTER_TOKEN"] = token
        if cfg.ray.enabled:  # Ray's own token authentication: the nodes of one stack share the cluster token
            out["RAY_AUTH_TOKEN"] = token
    keys = cfg.api.api_keys or [k for k in os.environ.get("LLMSTACK_API_KEYS", "").split(",") if k.strip()]
    if keys:
        out["LLMSTACK_API_KEYS"] = ",".join(keys)
    if cfg.api.keys:
        out["LLMSTACK_API_KEY_RULES"] = json.dumps([rule.env_entry() for rule in cfg.api.keys])
    client_key = keys[0] if keys else cfg.api.client_key() or os.environ.get("LLMSTACK_API_KEY")
    if client_key:  # what the web UI presents
        out["LLMSTACK_API_KEY"] = client_key
    auth = ",".join(cfg.webui.auth) or os.environ.get("LLMSTACK_WEBUI_AUTH", "")
    if auth:
        out["LLMSTACK_WEBUI_AUTH"] = auth
    return out


def cluster_token_for(cfg: StackConfig | None, rd: RunDir) -> str | None:
    return os.environ.get("LLMSTACK_CLUSTER_TOKEN") or (cfg.stack.cluster_token if cfg else None) or rd.stored_token()


def preflight(cfg: StackConfig, specs: list[ServiceSpec]) -> list[str]:
    """Problems that would make a service fail at once: each names the service and what to change."""
    from llmstack.common.net import check_port_free

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


def parallel_problems(cfg: StackConfig, model_paths: list[Path]) -> tuple[list[str], list[str]]:
    """(problems, notes) of the vLLM workers' parallel sizes against their models' config.json, found before
    anything starts (vLLM's own check runs only once its engine process is up)."""
    from llmstack.services.engines.vllm.parallel import (
        ParallelConfigError,
        ParallelSizes,
        check_parallel_sizes,
        model_shape,
    )
    from llmstack.services.worker.engine_config import vllm_engine_args

    problems: list[str] = []
    notes: list[str] = []
    for i, (m, path) in enumerate(zip(cfg.models, model_paths, strict=True)):
        if m.backend != "vllm":
            continue
        try:
            sizes = ParallelSizes.of(vllm_engine_args(m))
            if sizes.ranks > 1:
                notes += check_parallel_sizes(sizes, *model_shape(path), where=str(path))
        except ParallelConfigError as exc:
            problems.append(f"models[{i}] ({m.served_names[0]}): {exc}")
    return problems, notes


def exposure_warnings(cfg: StackConfig, specs: list[ServiceSpec], secrets: dict[str, str]) -> list[str]:
    from llmstack.common.net import is_loopback

    out = []
    for spec in specs:
        if is_loopback(spec.host):
            continue
        where = f"{spec.name} listens on {spec.host}:{spec.port}"
        if spec.role == "api" and not (secrets.get("LLMSTACK_API_KEYS") or cfg.api.keys_required):
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
    for rule in data["api"]["keys"]:
        for secret in ("key", "key_sha256"):
            if rule.get(secret):
                rule[secret] = "***"
    data["webui"]["auth"] = [a.split(":", 1)[0] + ":***" for a in data["webui"]["auth"]]
    return data


def keys_required(plan: Plan, secrets: dict[str, str]) -> bool:
    """Whether the stack's API server asks clients for a key."""
    if "LLMSTACK_API_KEYS" in secrets or "LLMSTACK_API_KEY_RULES" in secrets:
        return True
    return any(s.role == "api" and "--keys-file" in s.argv for s in plan.services)


def key_warnings(cfg: StackConfig) -> list[str]:
    """Model patterns of `[[api.keys]]` that match none of the models this stack serves (a typo, or a model
    served by another machine): not refused, since requests for such a model just answer 404."""
    served = [name for m in cfg.models for name in m.served_names]
    if not served:
        return []
    return [
        f"[[api.keys]] {rule.name!r}: model pattern {glob!r} matches none of the served models "
        f"({', '.join(served)}); its requests for it will get 404"
        for rule in cfg.api.keys
        for glob in rule.models
        if not any(fnmatchcase(name, glob) for name in served)
    ]


def model_plans(cfg: StackConfig, model_paths: list[Path] | None) -> list[ModelPlan]:
    """The run-time view of every `[[models]]` entry: load policy, footprint (estimated from the weights when
    their paths are known), and the worker services that serve it."""
    out = []
    for i, (m, names) in enumerate(zip(cfg.models, worker_service_names(cfg), strict=True)):
        footprint = None
        if model_paths is not None:
            footprint = estimate(model_paths[i], m)
            footprint = footprint.model_copy(
                update={
                    "host_bytes": footprint.host_bytes * m.replicas,
                    "gpu_bytes": {g: n * m.replicas for g, n in footprint.gpu_bytes.items()},
                }
            )
        out.append(
            ModelPlan(
                name=m.served_names[0],
                names=m.served_names,
                services=names,
                load=m.load,
                keep_alive=m.keep_alive,
                pin=m.pin,
                memory_bytes=m.memory * m.replicas if m.memory is not None else None,
                estimate=footprint,
            )
        )
    return out


def runtime_fields(cfg: StackConfig, model_paths: list[Path] | None, roles: list[str]) -> dict:
    """The Plan fields for models at run time (`Plan(**runtime_fields(...))`); no models where this machine
    runs no workers."""
    s = cfg.stack
    return {
        "models": model_plans(cfg, model_paths) if "workers" in roles else [],
        "memory_budget": s.memory_budget,
        "gpu_memory_budget": s.gpu_memory_budget,
        "admin": AdminPlan(host=s.admin_host, port=s.admin_port, key_env=s.admin_key_env),
    }
