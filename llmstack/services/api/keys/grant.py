"""One admitted request of one key: what it asks of the worker, what it is charged, what gets recorded.

The worker hop (`upstream.WorkerStream`) reports to the request's `Grant` through `current_meter`: the
prompt's token count as soon as the worker knows it (a first NDJSON event the grant asks for when the key
has a token limit), completion tokens as they stream, and each stream's final usage, which is recorded in
the usage store (durably) before the hop passes it on, so before the client can see it."""

from __future__ import annotations

from typing import Any

from llmstack.services.api.keys.ring import Key
from llmstack.services.api.keys.usage import Usage, UsageStore


class Grant:
    """Implements `upstream.Meter` for one request; `close` runs once the response has ended."""

    __slots__ = ("key", "model", "store", "fields", "prompted", "pending_prompt", "pending_completion", "recorded")

    def __init__(self, key: Key, model: str, store: UsageStore | None) -> None:
        self.key = key
        self.model = model
        self.store = store
        fields: dict[str, Any] = {}
        if key.rule.priority:
            fields["priority"] = key.rule.priority
        if key.rule.tpm is not None:
            fields["report_prompt_tokens"] = True
        self.fields = fields
        self.prompted = False  # the request's first prompt is checked against the token limit; later ones not
        self.pending_prompt = 0  # charged since the last usage report (recorded at close if none comes)
        self.pending_completion = 0
        self.recorded = False  # the request itself has been counted in the store
        key.limits.stats.requests += 1

    # -- upstream.Meter ------------------------------------------------------------------------------------
    def worker_fields(self) -> dict[str, Any]:
        return self.fields

    def prompt(self, tokens: int) -> None:
        if self.prompted:
            self.key.limits.spend(tokens)
        else:
            self.key.limits.prompt(tokens)  # may refuse: nothing has been generated yet
            self.prompted = True
        self.pending_prompt += tokens

    def generated(self, tokens: int) -> None:
        self.key.limits.spend(tokens)
        self.pending_completion += tokens

    async def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        limits = self.key.limits
        # what the stream did not report as it went (a prompt the worker was not asked to count first)
        limits.spend(max(0, prompt_tokens - self.pending_prompt) + max(0, completion_tokens - self.pending_completion))
        self.pending_prompt = self.pending_completion = 0
        limits.stats.prompt_tokens += prompt_tokens
        limits.stats.completion_tokens += completion_tokens
        self.prompted = True
        first, self.recorded = not self.recorded, True
        if self.store is not None:  # durable when this returns: before the usage reaches the client
            self.store.record(Usage(self.key.name, self.model, int(first), 0, prompt_tokens, completion_tokens))

    # -- end ---------------------------------------------------------------------------------------------------
    def close(self, status: int) -> None:
        """The response has ended with `status`: free the concurrency slot, record what is not recorded yet."""
        limits = self.key.limits
        limits.release()
        error = status >= 400
        if error:
            limits.stats.errors += 1
        left = self.pending_prompt or self.pending_completion
        if self.store is not None and (error or left or not self.recorded):
            self.store.record(
                Usage(
                    self.key.name,
                    self.model,
                    int(not self.recorded),
                    int(error),
                    self.pending_prompt,
                    self.pending_completion,
                )
            )
        limits.stats.prompt_tokens += self.pending_prompt
        limits.stats.completion_tokens += self.pending_completion
