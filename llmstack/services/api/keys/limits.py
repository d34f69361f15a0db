"""Per-key limits: requests and tokens per minute as token buckets, requests under way as a count.

A bucket holds up to one minute's allowance and refills continuously (rpm/60 per second), so a key may
burst up to its limit and then goes at its rate; `Retry-After` is the time until the bucket holds what
was asked for, so a client that waits that long succeeds (unless it was used meanwhile).

Tokens: a request needs a non-empty token bucket to start; its prompt tokens are taken as soon as the
worker has counted them (before generation), and refused with 429 when the bucket cannot cover them; its
completion tokens are taken as they stream and may run the bucket into debt, which later requests wait
out.  The headers are OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmstack.common.errors import RateLimited
from llmstack.services.api.keys.rules import KeyRule

Clock = Callable[[], float]


class Bucket:
    """`per_minute` units, refilled continuously; the level may go below zero (debt)."""

    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.level

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds `amount` (0: it does now)."""
        return max(0.0, (amount - self.refill(now)) / self.rate)

    def reset_in(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.refill(now)) / self.rate

    def resize(self, per_minute: int, now: float) -> None:
        """A changed limit keeps what was used: the level moves with the capacity."""
        used = self.capacity - self.refill(now)
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = min(self.capacity, self.capacity - used)


def _bucket(old: Bucket | None, per_minute: int | None, now: float) -> Bucket | None:
    if per_minute is None:
        return None
    if old is None:
        return Bucket(per_minute, now)
    if old.capacity != per_minute:
        old.resize(per_minute, now)
    return old


@dataclass
class KeyStats:
    """Counts since the process started, read by the metrics at scrape time."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    limited: dict[str, int] = field(default_factory=lambda: {"rpm": 0, "tpm": 0, "concurrency": 0})


class KeyLimits:
    """The live limit state of one key name; kept across reloads of the keys (by name)."""

    def __init__(self, rule: KeyRule, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.rule = rule
        self.requests: Bucket | None = None
        self.tokens: Bucket | None = None
        self.running = 0
        self.last_prompt = 1  # a typical prompt of this key, for the Retry-After of a key in token debt
        self.stats = KeyStats()
        self.apply(rule)

    def apply(self, rule: KeyRule) -> None:
        now = self.clock()
        self.rule = rule
        self.requests = _bucket(self.requests, rule.rpm, now)
        self.tokens = _bucket(self.tokens, rule.tpm, now)

    # -- checks -----------------------------------------------------------------------------------------
    def admit(self) -> None:
        """Take one request, or raise `RateLimited` (nothing taken) naming the limit and when to retry."""
        rule, now = self.rule, self.clock()
        if rule.max_concurrent is not None and self.running >= rule.max_concurrent:
            self.stats.limited["concurrency"] += 1
            raise self._error(
                f"Too many concurrent requests for key '{rule.name}': limit {rule.max_concurrent}. "
                "Please try again when one of them has finished.",
                1.0,
                "requests",
            )
        wait_requests = self.requests.wait_for(1, now) if self.requests is not None else 0.0
        wait_tokens = 0.0
        if self.tokens is not None and self.tokens.refill(now) < 1:
            wait_tokens = self.tokens.wait_for(min(self.last_prompt, self.tokens.capacity), now)
        if wait_requests > 0 or wait_tokens > 0:
            kind = "requests" if wait_requests >= wait_tokens else "tokens"
            self.stats.limited["rpm" if kind == "requests" else "tpm"] += 1
            requested = 1 if kind == "requests" else self.last_prompt
            raise self._error(self._message(kind, requested), max(wait_requests, wait_tokens), kind)
        if self.requests is not None:
            self.requests.level -= 1
        self.running += 1

    def prompt(self, tokens: int) -> None:
        """The first prompt of an admitted request: take its tokens, or raise `RateLimited` (none taken)."""
        self.last_prompt = max(1, tokens)
        bucket = self.tokens
        if bucket is None:
            return
        now = self.clock()
        if tokens > bucket.capacity:
            self.stats.limited["tpm"] += 1
            raise self._error(
                f"Request too large for key '{self.rule.name}' on tokens per min (TPM): Limit "
                f"{int(bucket.capacity)}, Requested {tokens}. The input must be shorter to run successfully.",
                None,
                "tokens",
            )
        wait = bucket.wait_for(tokens, now)
        if wait > 0:
            self.stats.limited["tpm"] += 1
            # the request was counted against rpm when it was admitted: the retry must find a request too
            if self.requests is not None:
                wait = max(wait, self.requests.wait_for(1, now))
            raise self._error(self._message("tokens", tokens), wait, "tokens")
        bucket.level -= tokens

    def spend(self, tokens: int) -> None:
        """Tokens used without a check (completion tokens as they stream, later prompts): may go into debt."""
        if self.tokens is not None and tokens:
            self.tokens.refill(self.clock())
            self.tokens.level -= tokens

    def release(self) -> None:
        self.running -= 1

    # -- reporting ---------------------------------------------------------------------------------------
    def headers(self) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the limits this key has (none for a key without rates)."""
        out: dict[str, str] = {}
        now = self.clock()
        for suffix, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                level = bucket.refill(now)
                out[f"x-ratelimit-limit-{suffix}"] = str(int(bucket.capacity))
                out[f"x-ratelimit-remaining-{suffix}"] = str(max(0, math.floor(level)))
                out[f"x-ratelimit-reset-{suffix}"] = format_duration((bucket.capacity - level) / bucket.rate)
        return out

    def _message(self, kind: str, requested: int) -> str:
        bucket = self.requests if kind == "requests" else self.tokens
        assert bucket is not None
        label = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        used = max(0, math.ceil(bucket.capacity - bucket.level))
        return (
            f"Rate limit reached for key '{self.rule.name}' on {label}: Limit {int(bucket.capacity)}, Used {used}, "
            f"Requested {requested}."
        )

    def _error(self, message: str, retry_after: float | None, kind: str) -> RateLimited:
        if retry_after is not None:
            message += f" Please try again in {format_duration(retry_after)}."
        return RateLimited(message, retry_after=retry_after, kind=kind, headers=self.headers())


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in `x-ratelimit-reset-*`: 250ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds * 1000) / 1000, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
