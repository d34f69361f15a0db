"""Prometheus metrics shared by the API server and workers, and the access log.

Names follow Prometheus conventions: `llmstack_<service>_...`, base units (seconds), `_total` on
counters.  Model labels are bounded: a name the service does not serve is counted as "unknown", so
clients cannot blow up the label space.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("llmstack.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
UNKNOWN_MODEL = "unknown"


class ServingMetrics:
    """Request, latency and token metrics of one serving process (`service` is "api" or "worker")."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        p = f"llmstack_{service}"
        r = self.registry
        self.requests = Counter(f"{p}_requests", "Requests by model, endpoint and final status.",
                                ["model", "endpoint", "status"], registry=r)  # fmt: skip
        self.duration = Histogram(f"{p}_request_duration_seconds", "End-to-end request latency.",
                                  ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time to the first generated token.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              ["model"], buckets=PER_TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.running = Gauge(f"{p}_requests_running", "Requests in progress.", ["model"], registry=r)

    def track(self, model: str) -> RequestTracker:
        return RequestTracker(self, model)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestTracker:
    """Timing and token accounting of one request; the metrics middleware closes it."""

    __slots__ = ("metrics", "model", "started", "first_token_at", "status", "tokens", "closed")

    def __init__(self, metrics: ServingMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.status: int | None = None  # set when a stream ends in an error after a 200
        self.tokens = (0, 0)
        self.closed = False
        metrics.running.labels(model).inc()

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.metrics.ttft.labels(self.model).observe(self.first_token_at - self.started)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        self.tokens = (self.tokens[0] + prompt_tokens, self.tokens[1] + completion_tokens)
        m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        m.generation_tokens.labels(self.model).inc(completion_tokens)
        if completion_tokens > 1 and self.first_token_at is not None:
            m.tpot.labels(self.model).observe((time.perf_counter() - self.first_token_at) / (completion_tokens - 1))

    def failed(self, status: int) -> None:
        self.status = status

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.metrics.running.labels(self.model).dec()


class MetricsMiddleware:
    """Counts every request on the given paths with its final status (a stream that ends in an error
    event counts with that error's status) and writes one access-log line per request."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServingMetrics,
        endpoints: Callable[[str], str | None],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        state = scope.setdefault("state", {})

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            tracker: RequestTracker | None = state.get("tracker")
            model = tracker.model if tracker else state.get("model", UNKNOWN_MODEL)
            final = tracker.status if tracker and tracker.status else status
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(model, endpoint, str(final)).inc()
            self.metrics.duration.labels(model, endpoint).observe(elapsed)
            tokens = ""
            if tracker is not None:
                tracker.close()
                if tracker.tokens != (0, 0):
                    tokens = f" prompt_tokens={tracker.tokens[0]} completion_tokens={tracker.tokens[1]}"
            key = f" key={state['key_name']}" if "key_name" in state else ""  # the key's name, never the key
            access_log.info(
                "%s %s %d model=%s%s %.3fs%s", scope["method"], scope["path"], final, model, key, elapsed, tokens
            )


def gauge_collector(
    name: str, documentation: str, labels: list[str], read: Callable[[], Iterable[tuple[list[str], float]]]
) -> Any:
    """A collector that reads live values at scrape time (routing tables, engine state)."""
    return _LiveCollector(GaugeMetricFamily, name, documentation, labels, read)


def counter_collector(
    name: str, documentation: str, labels: list[str], read: Callable[[], Iterable[tuple[list[str], float]]]
) -> Any:
    """Like `gauge_collector` for counts that only grow (`name` without `_total`)."""
    return _LiveCollector(CounterMetricFamily, name, documentation, labels, read)


class _LiveCollector:
    def __init__(self, family: type, name: str, documentation: str, labels: list[str], read: Callable[[], Any]) -> None:
        self.family, self.name, self.documentation, self.labels, self.read = family, name, documentation, labels, read

    def collect(self) -> Iterable[Any]:
        family = self.family(self.name, self.documentation, labels=self.labels)
        for label_values, value in self.read():
            family.add_metric(label_values, value)
        yield family
