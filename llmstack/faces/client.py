"""A small OpenAI-protocol client for the tools people use (web UI, terminal chat).

They talk to the API server exactly as any other client would, so API keys, routing and failover apply
to them too. Every failure leaves as a :class:`ClientError` whose message can be shown to a person as
is: no tracebacks, and a hint at what to do.

ClientError
+-- Unreachable     the API server cannot be reached (not running, wrong address, tunnel down)
+-- APIStatusError  the API server answered with an OpenAI error envelope (bad key, unknown model, ...)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmstack.common.net import bearer

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """A request to the API server failed; ``str(exc)`` is a readable sentence."""


class Unreachable(ClientError):
    """The API server did not answer at all."""


class APIStatusError(ClientError):
    """The API server answered with an error (``status`` is the HTTP status, ``code`` OpenAI's code)."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def normalize_base_url(url: str) -> str:
    """Accept ``host:port``, ``http://host:port`` or ``http://host:port/v1``; return the server root."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url.removesuffix("/v1")


def _hint(status: int, code: str | None, message: str) -> str:
    if status == 401:
        return f"{message} (the API server wants a key: pass --api-key or set LLMSTACK_API_KEY)"
    if status == 404 and code == "model_not_found":
        return f"{message} (check the name: /v1/models lists the served ones; is its worker running?)"
    if status == 503:
        return f"{message} (is its worker running?)"
    return message


def _status_error(status: int, body: bytes) -> APIStatusError:
    message, code = f"HTTP {status}", None
    try:
        error = json.loads(body).get("error") or {}
        message = str(error.get("message") or message)
        code = error.get("code")
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace").strip()
        if text:
            message = f"HTTP {status}: {text[:200]}"
    return APIStatusError(f"API server error: {_hint(status, code, message)}", status, code)


def _unreachable(base_url: str, exc: httpx.HTTPError) -> Unreachable:
    if isinstance(exc, httpx.TimeoutException):
        why = "it did not answer in time"
    elif isinstance(exc, httpx.ConnectError):
        why = "connection refused or host unreachable"
    else:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return Unreachable(f"cannot reach the API server at {base_url} ({why}). Is `llmstack api` running there?")


def _event_text(line: str) -> tuple[bool, str]:
    """Parse one SSE line; returns (done, text delta). Raises APIStatusError on an in-stream error."""
    if not line.startswith("data:"):
        return False, ""
    data = line[5:].strip()
    if data == "[DONE]":
        return True, ""
    try:
        event = json.loads(data)
    except ValueError:
        return False, ""
    if "error" in event:
        error = event["error"] or {}
        raise APIStatusError(f"API server error: {error.get('message', 'generation failed')}", 500, error.get("code"))
    parts = [(c.get("delta") or {}).get("content") or "" for c in event.get("choices") or []]
    return False, "".join(parts)


@dataclass
class ChatRequest:
    """One chat completion request; ``extra`` carries server-specific parameters such as ``ignore_eos``."""

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages, "stream": True, **self.extra}
        for key in ("temperature", "top_p", "max_tokens"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return body


def _timeout(read: float) -> httpx.Timeout:
    return httpx.Timeout(connect=5.0, read=read, write=10.0, pool=10.0)


class ChatClient:
    """Blocking client (terminal chat). One pooled connection per process."""

    def __init__(self, base_url: str = DEFAULT_API_URL, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = normalize_base_url(base_url)
        self._http = httpx.Client(headers=bearer(api_key), timeout=_timeout(timeout), trust_env=False)

    def close(self) -> None:
        self._http.close()

    def list_models(self) -> list[str]:
        try:
            resp = self._http.get(f"{self.base_url}/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if resp.status_code != 200:
            raise _status_error(resp.status_code, resp.content)
        return [m["id"] for m in resp.json().get("data", [])]

    def stream_chat(self, request: ChatRequest) -> Iterator[str]:
        """Yield text deltas as they arrive; closing the generator closes the HTTP stream (which
        makes the server stop generating)."""
        try:
            with self._http.stream("POST", f"{self.base_url}/v1/chat/completions", json=request.body()) as resp:
                if resp.status_code != 200:
                    raise _status_error(resp.status_code, resp.read())
                for line in resp.iter_lines():
                    done, text = _event_text(line)
                    if text:
                        yield text
                    if done:
                        return
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None


class AsyncChatClient:
    """Non-blocking client (web UI): a cancelled task closes its stream at once."""

    def __init__(self, base_url: str = DEFAULT_API_URL, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = normalize_base_url(base_url)
        self._http = httpx.AsyncClient(headers=bearer(api_key), timeout=_timeout(timeout), trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list_models(self) -> list[str]:
        try:
            resp = await self._http.get(f"{self.base_url}/v1/models", timeout=5.0)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if resp.status_code != 200:
            raise _status_error(resp.status_code, resp.content)
        return [m["id"] for m in resp.json().get("data", [])]

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[str]:
        try:
            async with self._http.stream("POST", f"{self.base_url}/v1/chat/completions", json=request.body()) as resp:
                if resp.status_code != 200:
                    raise _status_error(resp.status_code, await resp.aread())
                async for line in resp.aiter_lines():
                    done, text = _event_text(line)
                    if text:
                        yield text
                    if done:
                        return
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
