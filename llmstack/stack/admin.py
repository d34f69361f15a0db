"""The supervisor's admin HTTP API: list, load and unload models (`llmstack models` is its client).

It listens on loopback by default (`[stack] admin_host`, `admin_port`; no port: any free one) and records
where in the run directory (`admin.json`). Two credentials, never the public `/v1` keys:

- the admin key (`[stack] admin_key_env` names the variable holding it, else one generated into the run
  directory as `admin_key`, mode 0600): everything;
- the cluster token, which the stack's own API server holds: only listing the models and *demanding* an
  on-demand model (what a request for it does anyway), never loading a manual one or unloading.

Routes (errors in OpenAI's envelope; 401 without or with a wrong key)::

    GET  /health                       no key
    GET  /models                       admin key or cluster token
    GET  /events                       admin key: loads, unloads, evictions, refusals (newest last)
    POST /models/{name}/load           admin key    ?wait=true&timeout=S
    POST /models/{name}/demand         either       ?timeout=S   (on-demand models only)
    POST /models/{name}/unload         admin key    ?wait=true&timeout=S

The handlers run on the server's own thread and only hand commands to the supervisor's loop
(`Lifecycle.submit`), awaiting their futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llmstack.common.errors import AuthenticationError, InvalidRequest, LLMStackError, PermissionDenied
from llmstack.common.http import install_error_handlers
from llmstack.stack.lifecycle import Lifecycle, LifecycleEvent, ModelRow

if TYPE_CHECKING:
    from llmstack.stack.supervisor import Supervisor

ADMIN_FILE = "admin.json"
KEY_FILE = "admin_key"

Role = Literal["admin", "service"]


class AdminInfo(BaseModel):
    """What the run directory says about the admin API: where it is, and where its key comes from."""

    url: str
    key_env: str | None = None
    pid: int | None = None


class ModelReply(BaseModel):
    model: ModelRow
    done: bool = True  # False: still under way when the wait ended


class AdminKeyError(ValueError):
    """The admin key cannot be had (its variable is unset) or is unsafe (it equals a /v1 key)."""


def admin_key(run_root: Path, key_env: str | None, env: dict[str, str] | None = None) -> str:
    """The admin key: from the variable `key_env` names, else the run directory's generated one (created
    once, mode 0600)."""
    env = dict(os.environ) if env is None else env
    if key_env:
        value = env.get(key_env, "").strip()
        if not value:
            raise AdminKeyError(f"[stack] admin_key_env = {key_env!r} but ${key_env} is not set; set it")
        return value
    path = run_root / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    run_root.mkdir(parents=True, exist_ok=True)
    key = "llmstack-admin-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    os.chmod(path, 0o600)
    return key


def read_admin_info(run_root: Path) -> AdminInfo | None:
    try:
        return AdminInfo.model_validate_json((run_root / ADMIN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def build_admin_app(lifecycle: Lifecycle, key: str, cluster_token: str | None) -> FastAPI:
    app = FastAPI(title="llmstack admin", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    async def role(request: Request) -> Role:
        token = _bearer(request)
        if token is None:
            raise AuthenticationError(
                "You didn't provide the admin key. Pass it as 'Authorization: Bearer <key>' "
                "(`llmstack models` reads it from the run directory).",
                code="missing_api_key",
            )
        if hmac.compare_digest(token.encode(), key.encode()):
            return "admin"
        if cluster_token and hmac.compare_digest(token.encode(), cluster_token.encode()):
            return "service"
        raise AuthenticationError("Incorrect admin key provided.")

    async def admin_only(who: Role = Depends(role)) -> None:
        if who != "admin":
            raise PermissionDenied("This needs the admin key; the cluster token may only list and demand models.")

    async def wait_for(op: str, name: str, wait: bool, timeout: float) -> JSONResponse:
        if not 0 < timeout <= 24 * 3600:
            raise InvalidRequest("timeout must be between 0 and 86400 seconds", param="timeout")
        future = lifecycle.submit(op, name, timeout)  # type: ignore[arg-type]
        try:
            row = await asyncio.wait_for(asyncio.wrap_future(future), timeout if wait else 0.5)
        except TimeoutError:
            current = next((r for r in lifecycle.rows if name in r.names or r.name == name), None)
            if current is None:
                raise
            return JSONResponse(ModelReply(model=current, done=False).model_dump(mode="json"), status_code=202)
        return JSONResponse(ModelReply(model=row).model_dump(mode="json"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/models", dependencies=[Depends(role)])
    async def models() -> dict:
        return {"models": [r.model_dump(mode="json") for r in lifecycle.rows]}

    @app.get("/events", dependencies=[Depends(admin_only)])
    async def events() -> dict:
        return {"events": [e.model_dump(mode="json") for e in list(lifecycle.events)]}

    @app.post("/models/{name:path}/load", dependencies=[Depends(admin_only)])
    async def load(name: str, wait: bool = True, timeout: float = 900.0) -> JSONResponse:
        return await wait_for("load", name, wait, timeout)

    @app.post("/models/{name:path}/demand", dependencies=[Depends(role)])
    async def demand(name: str, timeout: float = 120.0) -> JSONResponse:
        return await wait_for("demand", name, True, timeout)

    @app.post("/models/{name:path}/unload", dependencies=[Depends(admin_only)])
    async def unload(name: str, wait: bool = True, timeout: float = 120.0) -> JSONResponse:
        return await wait_for("unload", name, wait, timeout)

    return app


class AdminServer:
    """The admin app on its own thread (uvicorn, no signal handlers: the supervisor owns those)."""

    def __init__(self, app: FastAPI, host: str, port: int | None) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port or 0))  # raises OSError naming nothing: the caller says which address
        self.port = int(self.sock.getsockname()[1])
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{self.port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.sock.close()


def write_admin_info(run_root: Path, info: AdminInfo) -> None:
    tmp = run_root / f".{ADMIN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info.model_dump()), encoding="utf-8")
    os.replace(tmp, run_root / ADMIN_FILE)


def events_of(payload: dict) -> list[LifecycleEvent]:
    return [LifecycleEvent.model_validate(e) for e in payload.get("events", [])]


__all__ = ["AdminInfo", "AdminKeyError", "AdminServer", "LLMStackError", "admin_key", "build_admin_app"]


def serve_admin(sup: Supervisor) -> AdminServer | None:
    """Start the admin API of a supervisor that runs models; None (and a logged reason) when it cannot."""
    plan = sup.plan
    if not plan.models:
        return None
    root = sup.run_dir.root
    try:
        key = admin_key(root, plan.admin.key_env, sup.base_env)
        server = AdminServer(
            build_admin_app(sup.lifecycle, key, sup.secrets.get("LLMSTACK_CLUSTER_TOKEN")),
            plan.admin.host,
            plan.admin.port,
        )
    except (AdminKeyError, OSError) as exc:
        where = f"{plan.admin.host}:{plan.admin.port or 'any port'}"
        sup.event(f"admin API not started on {where}: {exc}; no `llmstack models`, no on-demand loads", "ERROR")
        return None
    server.start()
    write_admin_info(root, AdminInfo(url=server.url, key_env=plan.admin.key_env, pid=os.getpid()))
    sup.event(f"admin API on {server.url} (key: {'$' + plan.admin.key_env if plan.admin.key_env else root / KEY_FILE})")
    return server


def admin_key_of_env(key_env: str | None, secrets: dict[str, str]) -> None:
    """Check, before `up`, that the admin key named by `[stack] admin_key_env` is set and is no /v1 key."""
    if not key_env:
        return
    value = os.environ.get(key_env, "").strip()
    if not value:
        raise AdminKeyError(f"[stack] admin_key_env = {key_env!r} but ${key_env} is not set; set it")
    public = [k for k in secrets.get("LLMSTACK_API_KEYS", "").split(",") if k]
    if value in public or value in secrets.get("LLMSTACK_API_KEY_RULES", ""):
        raise AdminKeyError(f"${key_env} is also one of the /v1 API keys; the admin key must be a different secret")
