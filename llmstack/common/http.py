"""What every llmstack HTTP service shares: logging with request ids, error envelopes, body limits,
bearer-token checks and the uvicorn runner."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import logging
import math
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from llmstack.common.errors import AuthenticationError, InvalidRequest, LLMStackError, Overloaded, PayloadTooLarge

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

log = logging.getLogger("llmstack")


# -- logging -----------------------------------------------------------------------------------------
class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(service: str, *, debug: bool = False) -> None:
    """Plain lines on stderr: time, level, service, request id, message (the supervisor files them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # uvicorn's access log goes through our handler so it carries the request id too
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# -- errors --------------------------------------------------------------------------------------------
#: An API's error body for an error and the request id (None when there is none): OpenAI's envelope by
#: default; an app may register others for some of its paths (Anthropic's Messages API has its own).
ErrorShape = Callable[[LLMStackError, str | None], dict[str, Any]]


def _openai_shape(exc: LLMStackError, request_id: str | None) -> dict[str, Any]:
    return exc.to_body(request_id)


def error_response(exc: LLMStackError, shape: ErrorShape | None = None) -> JSONResponse:
    headers = dict(exc.headers)
    if isinstance(exc, Overloaded) and exc.retry_after is not None:
        # whole seconds, rounded up: a client that waits this long finds room
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        headers["retry-after-ms"] = str(max(1, math.ceil(exc.retry_after * 1000)))  # read first by OpenAI's SDKs
    rid = request_id_var.get()
    body = (shape or _openai_shape)(exc, rid if rid != "-" else None)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def shape_for(app: Any, path: str) -> ErrorShape | None:
    """The error shape `install_error_handlers` registered for a path of `app`, if any."""
    for prefix, shape in getattr(getattr(app, "state", None), "error_shapes", ()):
        if path.startswith(prefix):
            return shape
    return None


_UNION_BRANCHES = ("str", "int", "float", "bool", "list[str]", "list[int]", "function-after")
_JSON_TYPES = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "string": "a string",
    "list": "an array",
    "dict": "an object",
    "model": "an object",
    "model_attributes": "an object",
}


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a decimal number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else "null"


def _param(loc: Sequence[Any]) -> str | None:
    # union errors add the tried branch's type to the location; keep only the field path
    path = [str(p) for p in loc if p != "body" and str(p) not in _UNION_BRANCHES and "[" not in str(p)]
    return ".".join(path) if path else None


def validation_error(errors: Sequence[Any]) -> InvalidRequest:
    """The first problem of a body that failed validation, as OpenAI words it: a missing or unknown
    parameter, a wrong type (`invalid_type`, never coerced), or an invalid value."""
    if not errors:
        return InvalidRequest("Invalid request body.")
    # a union (e.g. stop: str | list[str]) reports one error per branch: the branch that failed on a
    # constraint says more than one that failed on the type, and one that got further into the value more
    # than one that did not
    first = min(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request: " + str(first.get("msg")))
    param = _param(first.get("loc", ()))
    if param is None:
        if kind in ("model_attributes_type", "model_type", "dict_type"):
            return InvalidRequest("The request body must be a JSON object.")
        return InvalidRequest(str(first.get("msg", "Invalid request body.")))
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if kind.endswith("_type"):
        expected = [
            _JSON_TYPES.get(str(e["type"])[: -len("_type")], "another type")
            for e in errors
            if _param(e.get("loc", ())) == param and str(e.get("type", "")).endswith("_type")
        ]
        wanted = " or ".join(dict.fromkeys(expected))
        got = _json_type(first.get("input"))
        return InvalidRequest(
            f"Invalid type for '{param}': expected {wanted}, but got {got} instead.", param=param, code="invalid_type"
        )
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


def install_error_handlers(app: FastAPI, shapes: Sequence[tuple[str, ErrorShape]] = ()) -> None:
    """Every error leaves as an error envelope with a meaningful status; never FastAPI's 422 shape.
    OpenAI's envelope, except under the path prefixes `shapes` names."""
    app.state.error_shapes = list(shapes)

    @app.exception_handler(LLMStackError)
    async def _ours(request: Request, exc: LLMStackError) -> JSONResponse:
        return error_response(exc, shape_for(app, request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()), shape_for(app, request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: ("Not found: " + request.url.path, "not_found"), 405: ("Method not allowed.", None)}
        message, code = kinds.get(exc.status_code, (str(exc.detail), None))
        err = LLMStackError(message, code=code)
        err.status_code = exc.status_code
        err.type = "invalid_request_error"
        return error_response(err, shape_for(app, request.url.path))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(LLMStackError(f"Internal error: {type(exc).__name__}"), shape_for(app, request.url.path))


# -- middleware (pure ASGI: cheaper than BaseHTTPMiddleware on the streaming path) -----------------------
class RequestContextMiddleware:
    """Assigns the request id (kept from X-Request-Id when given) and rejects oversized bodies."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        length = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value.decode("latin-1")[:128]
            elif key == b"content-length":
                length = value
        token = request_id_var.set(rid or uuid.uuid4().hex)
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                exc = PayloadTooLarge(f"Request body larger than {self.max_body_bytes} bytes.")
                await error_response(exc, shape_for(self.app, scope.get("path", "")))(scope, receive, send)
                return
            received = 0

            async def limited_receive() -> dict[str, Any]:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise PayloadTooLarge(f"Request body larger than {self.max_body_bytes} bytes.")
                return message

            rid_header = (b"x-request-id", request_id_var.get().encode("latin-1"))

            async def send_with_id(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), rid_header]}
                await send(message)

            await self.app(scope, limited_receive, send_with_id)
        finally:
            request_id_var.reset(token)


# -- bearer tokens -----------------------------------------------------------------------------------------
def parse_keys(raw: str | Iterable[str] | None) -> list[str]:
    if raw is None:
        return []
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return [k.strip() for k in items if k and k.strip()]


def check_bearer(request: Request, keys: list[str], *, what: str = "API key") -> None:
    """Constant-time comparison against every configured key; raises 401 in OpenAI's shape."""
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            f"You didn't provide an {what}. Pass it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    if not _matches(token.strip(), keys):
        raise AuthenticationError(f"Incorrect {what} provided.")


def _matches(token: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:  # no early exit: timing must not reveal which key matched
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


def check_api_key(request: Request, keys: list[str]) -> str | None:
    """The API key of a request, from `Authorization: Bearer <key>` (OpenAI's clients) or `x-api-key`
    (Anthropic's), checked in constant time against every configured key; raises 401.  Returns the key
    presented (None when none is configured and none was sent)."""
    header = request.headers.get("authorization", "")
    scheme, _, bearer = header.partition(" ")
    token = bearer.strip() if scheme.lower() == "bearer" else ""
    token = token or request.headers.get("x-api-key", "").strip()
    if not keys:
        return token or None
    if not token:
        raise AuthenticationError(
            "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            code="missing_api_key",
        )
    if not _matches(token, keys):
        raise AuthenticationError("Incorrect API key provided.")
    return token


# -- running ---------------------------------------------------------------------------------------------------
@dataclass
class TLSFiles:
    certfile: str | None = None
    keyfile: str | None = None

    @classmethod
    def resolve(cls, enabled: bool, certfile: str | None, keyfile: str | None) -> TLSFiles:
        """`--ssl` takes the files from flags or from LLMSTACK_SSL_CERTFILE / LLMSTACK_SSL_KEYFILE
        (SSL_CERTFILE / SSL_KEYFILE as in FastChat's tutorial)."""
        if not enabled:
            return cls()
        cert = certfile or os.environ.get("LLMSTACK_SSL_CERTFILE") or os.environ.get("SSL_CERTFILE")
        key = keyfile or os.environ.get("LLMSTACK_SSL_KEYFILE") or os.environ.get("SSL_KEYFILE")
        if not cert or not key:
            raise ValueError(
                "--ssl needs a certificate and a key: pass --ssl-certfile/--ssl-keyfile or set "
                "LLMSTACK_SSL_CERTFILE and LLMSTACK_SSL_KEYFILE"
            )
        for path in (cert, key):
            if not os.path.isfile(path):
                raise ValueError(f"--ssl: file not found: {path}")
        return cls(cert, key)


def serve(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    tls: TLSFiles | None = None,
    drain_timeout: float = 30.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """Runs the app's `before_drain` hook (e.g. a worker leaving the controller) when a stop begins,
        before uvicorn stops accepting and waits up to `drain_timeout` for requests under way."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            hook = getattr(getattr(app, "state", None), "before_drain", None)
            if hook is not None:
                try:
                    await asyncio.wait_for(hook(), timeout=5.0)
                except Exception as exc:  # a failed hook must not stop the drain
                    log.warning("before-drain step failed: %s", exc)
            await super().shutdown(sockets)

    tls = tls or TLSFiles()
    config = uvicorn.Config(
        RequestContextMiddleware(app, max_body_bytes),
        host=host,
        port=port,
        ssl_certfile=tls.certfile,
        ssl_keyfile=tls.keyfile,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=drain_timeout,
        timeout_keep_alive=30,
    )
    Server(config).run()


class StreamingResponseWithDisconnect(StreamingResponse):
    """Streams while listening for the client going away, and cancels the body iterator at once when
    it does (so generation upstream is aborted without waiting for the next token to fail a send)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def run_stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(run_stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            # A cancel that lands while a chunk is being sent leaves the body iterator suspended at its
            # yield; close it now (not at some later garbage collection) so the upstream stream ends.
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
