"""The keys as every endpoint uses them, on `app.state.keys`.

Any endpoint (OpenAI's, or another API's in its own package) does two calls:

    Depends(require_key)        who is asking: `Authorization: Bearer <key>` or `x-api-key: <key>`; 401 if
                                the key is missing or unknown
    admit(request, model)       may this key use this model now: 404 exactly as for a model that does not
                                exist, 429 over a limit; afterwards the worker hop meters the request

`KeysMiddleware` adds the `x-ratelimit-*` headers when the response starts and ends each admitted request
(its concurrency slot, what is left to record) when the response has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Collection
from fnmatch import fnmatchcase

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmstack.common.errors import AuthenticationError, NotFound, RateLimited
from llmstack.common.metrics import UNKNOWN_MODEL, counter_collector, gauge_collector
from llmstack.services.api.keys.grant import Grant
from llmstack.services.api.keys.limits import KeyLimits
from llmstack.services.api.keys.ring import ANONYMOUS, Key
from llmstack.services.api.keys.rules import KeyRule
from llmstack.services.api.keys.source import KeysSource
from llmstack.services.api.keys.usage import Usage, UsageStore
from llmstack.services.api.upstream import current_meter

log = logging.getLogger("llmstack.api.keys")


def _anonymous() -> Key:
    rule = KeyRule(name=ANONYMOUS, key_sha256="0" * 64)
    return Key(ANONYMOUS, b"", rule, KeyLimits(rule), every_model=True)


class KeyService:
    """Authentication, admission and per-key metrics over a `KeysSource` and an optional `UsageStore`."""

    def __init__(self, source: KeysSource, store: UsageStore | None, served: Callable[[], Collection[str]]) -> None:
        self.source = source
        self.store = store
        self.served = served
        self.anonymous = _anonymous() if store is not None else None  # usage without keys still counts
        self._warned: set[tuple[str, str]] = set()
        self._models_seen: frozenset[str] = frozenset()

    # -- per request -------------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> Key | None:
        if not self.source.required:
            return self.anonymous
        token = _presented_key(request)
        if token is None:
            raise AuthenticationError(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        key = self.source.ring.identify(token)
        if key is None:
            raise AuthenticationError("Incorrect API key provided.")
        request.state.key_name = key.name
        return key

    def admit(self, request: Request, model: str) -> None:
        key: Key | None = getattr(request.state, "key", None)
        if key is None:
            return
        served = self.served()
        if not key.allows(model):
            self._refused(key, model if model in served else UNKNOWN_MODEL)
            raise NotFound(f"The model '{model}' does not exist.", param="model")  # as for an unknown model
        label = model if model in served else UNKNOWN_MODEL
        try:
            key.limits.admit()
        except RateLimited:
            self._refused(key, label)
            raise
        grant = Grant(key, label, self.store)
        request.state.grant = grant
        current_meter.set(grant)

    def visible(self, request: Request, models: list[str]) -> list[str]:
        """The models this request's key may see (for /v1/models)."""
        key: Key | None = getattr(request.state, "key", None)
        return models if key is None else [m for m in models if key.allows(m)]

    def _refused(self, key: Key, model: str) -> None:
        key.limits.stats.requests += 1
        key.limits.stats.errors += 1
        if self.store is not None:
            self.store.record(Usage(key.name, model, requests=1, errors=1))

    # -- in the background -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Reload the keys file when it changes or on SIGHUP; warn about patterns that match no model."""
        loop = asyncio.get_running_loop()
        if self.source.keys_file is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.source.reload("SIGHUP")))
        try:
            while True:
                await self.source.changed()
                self.warn_unmatched()
                await asyncio.sleep(self.source.poll_interval)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)

    def warn_unmatched(self) -> None:
        """Log once each model pattern of a key that matches none of the served models (a typo, or a model
        not online yet: requests for it answer 404 until it is)."""
        models = frozenset(self.served())
        if not models:
            return
        if models != self._models_seen:
            self._models_seen = models
            self._warned.clear()
        for key in self.source.ring.keys:
            for glob in key.rule.models:
                if (key.name, glob) in self._warned or any(fnmatchcase(m, glob) for m in models):
                    continue
                self._warned.add((key.name, glob))
                log.warning(
                    "key %r: model pattern %r matches none of the served models (%s); requests for it get 404",
                    key.name, glob, ", ".join(sorted(models)),
                )  # fmt: skip


def key_collectors(limits: dict[str, KeyLimits]) -> list[object]:
    """Per-key counters and the running gauge, read at scrape time; labels: key names (and the limit)."""

    def counts(attr: str):  # noqa: ANN202
        return lambda: [([name], float(getattr(s.stats, attr))) for name, s in limits.items()]

    def limited():  # noqa: ANN202
        return [([name, why], float(n)) for name, s in limits.items() for why, n in s.stats.limited.items()]

    docs = {
        "requests": "Requests by API key name (admitted or refused after authentication).",
        "errors": "Requests by API key name that ended in an error (refusals included).",
        "prompt_tokens": "Prompt tokens by API key name.",
        "completion_tokens": "Completion tokens by API key name.",
    }
    out: list[object] = [counter_collector(f"llmstack_api_key_{a}", d, ["key"], counts(a)) for a, d in docs.items()]
    out.append(
        counter_collector("llmstack_api_key_rate_limited", "429 refusals by key and limit.", ["key", "limit"], limited)
    )
    out.append(
        gauge_collector(
            "llmstack_api_key_requests_running",
            "Requests under way by API key name.",
            ["key"],
            lambda: [([name], float(s.running)) for name, s in limits.items()],
        )
    )
    return out


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None
    key = request.headers.get("x-api-key", "").strip()  # Anthropic's header, for its API's endpoints
    return key or None


async def require_key(request: Request) -> None:
    """The dependency every `/v1` route takes (async: a plain def would run in the thread pool)."""
    request.state.key = request.app.state.keys.authenticate(request)


def admit(request: Request, model: str) -> None:
    """Check the request's key against `model` and its limits; raises 404 / 429."""
    request.app.state.keys.admit(request, model)


class KeysMiddleware:
    """Adds the key's `x-ratelimit-*` headers to the response and closes the request's grant at its end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                grant: Grant | None = state.get("grant")
                if grant is not None and (grant.key.rule.rpm or grant.key.rule.tpm) and status != 429:
                    extra = [(k.encode(), v.encode()) for k, v in grant.key.limits.headers().items()]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            grant = state.pop("grant", None)
            if grant is not None:
                tracker = state.get("tracker")
                failed = getattr(tracker, "status", None)  # a stream that ended in an error event after a 200
                grant.close(failed or status)
