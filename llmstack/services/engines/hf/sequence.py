"""One generation in the transformers engine: its inputs, its per-request state (engine thread only), the
queue its chunks go to, and what happens when it gets a token (stops, limits, streaming)."""

from __future__ import annotations

import asyncio
from typing import Any

from llmstack.common.wire import SamplingParams
from llmstack.services.engines.base import Chunk
from llmstack.services.engines.hf.sampling import Sampled, SequenceSampler
from llmstack.services.engines.text.decoding import IncrementalDetokenizer, StopStrings, TokenTexts


class Sequence:
    """A request's sequence.  `generated` grows by one token per step; `prefilled` counts the context
    positions already in a cache (from the prefix cache or earlier prefill chunks)."""

    __slots__ = (
        "prompt_ids",
        "params",
        "out",
        "loop",
        "cancelled",
        "generated",
        "sampler",
        "detok",
        "stops",
        "stop_ids",
        "limit",
        "pending_text",
        "pending_tokens",
        "pending_logprobs",
        "prompt_logprobs",
        "prefilled",
        "prompt_cached",
        "prompt_scores",
        "cache_reported",
    )

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.out: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.generated: list[int] = []
        self.sampler: SequenceSampler | None = None
        self.detok: IncrementalDetokenizer | None = None
        self.stops: StopStrings | None = None
        self.stop_ids: set[int] = set()
        self.limit = 0
        self.pending_text = ""
        self.pending_tokens = 0
        self.pending_logprobs: list[dict[str, Any]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[str, Any]] | None = None  # sent with the first chunk
        self.prefilled = 0
        # prompt tokens the prefix cache supplied at the first admission: the usage reports them, sent once
        # with the first chunk
        self.prompt_cached: int | None = None
        self.cache_reported = False
        self.prompt_scores: list[Any] = []  # per prefill chunk, all-position logits (prompt_logprobs only)

    def take_chunk(self, finish: str | None = None) -> Chunk:
        chunk = Chunk(self.pending_text, self.pending_tokens, finish, self.pending_logprobs, self.prompt_logprobs)
        if not self.cache_reported:
            chunk.cached_tokens, self.cache_reported = self.prompt_cached or 0, True
        if finish is not None and self.stops is not None:
            chunk.stop_sequence = self.stops.matched
        self.pending_text, self.pending_tokens, self.prompt_logprobs = "", 0, None
        if self.pending_logprobs is not None:
            self.pending_logprobs = []
        return chunk

    def admitted(self, cached: int) -> None:
        """Admitted with `cached` leading positions from the prefix cache; the first admission's count (of
        prompt tokens only) is what the usage reports, a re-admission after preemption changes nothing."""
        self.prefilled = cached
        if self.prompt_cached is None:
            self.prompt_cached = min(cached, len(self.prompt_ids))

    def push(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def context(self) -> list[int]:
        """What a prefill feeds: the prompt plus anything generated before the sequence was preempted."""
        return self.prompt_ids + self.generated if self.generated else self.prompt_ids

    @property
    def wants_prompt_scores(self) -> bool:
        """Prompt log-probabilities were asked for and not computed yet (they need every prompt position)."""
        return self.params.prompt_logprobs is not None and not self.generated

    def accept(self, sampled: Sampled, texts: TokenTexts, stream_interval: int) -> bool:
        """Record a sampled token, stream what is due (every `stream_interval` tokens, the first at once);
        True when the sequence is finished."""
        assert self.detok is not None and self.stops is not None and self.sampler is not None
        token = sampled.token
        self.generated.append(token)
        self.pending_tokens += 1
        finish: str | None = None
        constraint = self.sampler.constraint
        grammar_done = constraint is not None and (not constraint.accept(token) or constraint.finished)
        delta = ""
        stop_string = False
        if token in self.stop_ids:
            finish = "stop"
        else:
            delta = self.detok.add(token)
            text, stop_string = self.stops.feed(delta)
            self.pending_text += text
            if stop_string or grammar_done:
                finish = "stop"
            elif len(self.generated) >= self.limit:
                finish = "length"
        if finish is not None and not stop_string:  # the sequence ended: release held-back text
            tail, hit = self.stops.feed(self.detok.flush())
            delta += tail
            self.pending_text += tail if hit else tail + self.stops.flush()
        if self.pending_logprobs is not None:
            text = "" if token in self.stop_ids else delta
            self.pending_logprobs.append(texts.entry(token, sampled.logprob, sampled.top, text))
        if finish is not None:
            self.push(self.take_chunk(finish))
            return True
        due = max(1, stream_interval) if self.cache_reported else 1  # cache_reported: a chunk has left
        if self.pending_tokens >= due and self.pending_text:
            self.push(self.take_chunk())
        return False
