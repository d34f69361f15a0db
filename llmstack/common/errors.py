"""One exception root for llmstack, mapped to OpenAI's error envelope at the HTTP boundary.

LLMStackError                      500 internal_error
+-- InvalidRequest                 400 invalid_request_error (carries `param`)
|   +-- ContextLengthExceeded      400 code=context_length_exceeded
+-- AuthenticationError            401 invalid_api_key
+-- PermissionDenied               403 (cluster token mismatch)
+-- NotFound                       404 model_not_found
+-- Conflict                       409 (duplicate worker registration)
+-- Overloaded                     429 (queue full; carries Retry-After)
|   +-- RateLimited                429 a key over its limits (type requests/tokens, x-ratelimit-* headers)
+-- ServiceUnavailable             503 (no worker for a model)
+-- WorkerError                    502 (a worker failed mid-request)
"""

from __future__ import annotations

from typing import Any


class LLMStackError(Exception):
    status_code = 500
    type = "internal_error"
    code: str | None = None
    headers: dict[str, str] = {}  # extra response headers (read only; set per instance)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    @classmethod
    def from_body(cls, body: dict[str, Any], status_code: int | None = None) -> LLMStackError:
        """Rebuild a typed error from an envelope (worker -> API server)."""
        error = body.get("error") or {}
        kind = _BY_TYPE_AND_CODE.get((error.get("type"), error.get("code"))) or _BY_TYPE.get(
            error.get("type"), LLMStackError
        )
        if kind is LLMStackError and status_code in _BY_STATUS:
            kind = _BY_STATUS[status_code]
        return kind(str(error.get("message", "unknown error")), param=error.get("param"), code=error.get("code"))


class InvalidRequest(LLMStackError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationError(LLMStackError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(LLMStackError):
    status_code = 403
    type = "permission_error"


class NotFound(LLMStackError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Conflict(LLMStackError):
    status_code = 409
    type = "conflict_error"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "payload_too_large"


class Overloaded(LLMStackError):
    status_code = 429
    type = "server_overloaded"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    """OpenAI's rate-limit error: `type` says which limit ("requests" or "tokens"); `retry_after` is None when
    waiting cannot help (a request larger than the limit itself)."""

    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after: float | None, kind: str = "requests", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # type: ignore[assignment]
        self.type = kind
        self.headers = headers or {}


class ServiceUnavailable(LLMStackError):
    status_code = 503
    type = "service_unavailable"
    code = "no_worker"


class WorkerError(LLMStackError):
    status_code = 502
    type = "worker_error"


_BY_TYPE: dict[str | None, type[LLMStackError]] = {
    k.type: k for k in (AuthenticationError, PermissionDenied, Conflict, Overloaded, ServiceUnavailable, WorkerError)
}
_BY_TYPE["invalid_request_error"] = InvalidRequest
_BY_TYPE_AND_CODE: dict[tuple[str | None, str | None], type[LLMStackError]] = {
    ("invalid_request_error", "context_length_exceeded"): ContextLengthExceeded,
    ("invalid_request_error", "model_not_found"): NotFound,
    ("invalid_request_error", "payload_too_large"): PayloadTooLarge,
}
_BY_STATUS: dict[int, type[LLMStackError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: Overloaded,
    503: ServiceUnavailable,
}
