"""Anthropic's error shape, `{"type": "error", "error": {"type", "message"}, "request_id"}`, for the
Messages endpoints (the status codes are those of the same error everywhere else).  The error types are
those the anthropic SDK's own types know (it has none for 413: that is an invalid request there)."""

from __future__ import annotations

from typing import Any

from llmstack.common.errors import LLMStackError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(exc: LLMStackError, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": _TYPES.get(exc.status_code, "api_error"), "message": exc.message},
    }
    if request_id:
        body["request_id"] = request_id
    return body
