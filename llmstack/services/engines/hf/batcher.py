"""Continuous batching over the slot cache: what the engine thread does each scheduler step.

A step drops aborted sequences, admits waiting ones (each first looks up the prefix cache, so only the
part of its prompt not cached is computed), runs one prefill forward over the first prefilling rows (up
to `PREFILL_TOKENS` prompt tokens in all: several short prompts together, or the next chunk of a long
one), then one decode forward that gives every running sequence its next token.  A long prompt is thus
prefilled a chunk per step while the running streams keep getting tokens.  Prefilling and decoding rows
live in two slot caches (`slots`); a sequence whose prefill is done moves its row to the decoding one.

Everything the batch holds (both caches, padded to their longest row, and the prefix cache) stays
within `max_batch_tokens` positions: the prefix cache gives back its least recently used entries first,
then the newest running rows are preempted (they go back to the front of the line and resume, prompt
plus output, when room frees; greedy output is unchanged by it).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llmstack.services.engines.hf.attention import planned_forward
from llmstack.services.engines.hf.prefix import PrefixCache
from llmstack.services.engines.hf.probe import Batchable
from llmstack.services.engines.hf.sampling import Sampled, sample_rows
from llmstack.services.engines.hf.sequence import Sequence
from llmstack.services.engines.hf.slots import DECODE_WINDOW_SPARE, RowSource, SlotKV

log = logging.getLogger("llmstack.engine.hf")

# Prompt tokens per step (one prefill forward) before the running rows get their next token: larger
# chunks use the matrix units better, smaller ones keep the streams' inter-token gaps short.
PREFILL_TOKENS = 512
_PADDED_TOKENS = 768  # rows x width of one prefill forward: bounds the padding of unequal prompts


class Host(Protocol):
    """What the batcher needs from the engine."""

    model: Any
    device: Any
    waiting: deque[Sequence]

    def take_waiting(self) -> Sequence: ...

    def requeue(self, seq: Sequence) -> None: ...

    def prepare(self, seq: Sequence) -> None: ...

    def accept(self, seq: Sequence, sampled: Sampled) -> bool: ...

    def score_prompt(self, seq: Sequence, logits: Any) -> None: ...


@dataclass
class BatchLimits:
    max_rows: int
    max_positions: int


class Batcher:
    def __init__(self, host: Host, how: Batchable, limits: BatchLimits, prefix_caching: bool) -> None:
        self.host, self.how, self.limits = host, how, limits
        self.layout = how.layout
        window = self.layout.window or 0
        self._decode_window = window + DECODE_WINDOW_SPARE
        self._prefill_window = window - 1 + PREFILL_TOKENS + DECODE_WINDOW_SPARE
        self.decoding = self._cache(self._decode_window)
        self.prefilling = self._cache(self._prefill_window)
        self.running: list[Sequence] = []  # row i of `decoding`
        self.pending: list[Sequence] = []  # row i of `prefilling`
        self.prefix = PrefixCache(self.layout) if prefix_caching else None
        self.window_keep = 2 * window  # window positions a prefix entry keeps (W - 1 needed, the rest slack)
        self.preemptions = 0
        self.compiled: Any = None  # a compiled decode step (`compiled`), where the engine made one

    def compile_decode(self) -> bool:
        """Run decode steps through a compiled graph from now on (compiled here, on a scratch cache)."""
        from llmstack.services.engines.hf.compiled import compile_decode

        make = lambda: self._cache(self._decode_window)  # noqa: E731
        self.compiled = compile_decode(self.host.model, self.how.kernels, make, self.host.device)
        return self.compiled is not None

    def _cache(self, window_columns: int, rows: int = 4) -> SlotKV:
        return SlotKV(self.layout, self.how.specs, self.how.dtype, self.host.device, window_columns, rows)

    @property
    def rows(self) -> int:
        return len(self.running) + len(self.pending)

    def held(self) -> float:
        prefix = self.prefix.held if self.prefix is not None else 0.0
        return self.decoding.positions() + self.prefilling.positions() + prefix

    # -- a step ---------------------------------------------------------------------------------------------
    def step(self) -> int:
        """One scheduler iteration; returns the tokens it produced."""
        self._drop_cancelled()
        emitted = 0
        try:
            emitted += self._admit()
            emitted += self._prefill_step()
            if self.running:
                emitted += self._decode_step()
        except Exception as exc:  # a failed batch forward: every sequence in the batch gets the error
            log.exception("batched generation failed")
            self.fail_all(exc)
            return emitted
        self._enforce_budget()
        return emitted

    def fail_all(self, exc: BaseException, reset: bool = True) -> None:
        """Every sequence in the batch gets `exc`; the caches start afresh (unless shutting down)."""
        for seq in [*self.running, *self.pending]:
            seq.push(exc)
        self.running, self.pending = [], []
        if reset:
            self.decoding, self.prefilling = self._cache(self._decode_window), self._cache(self._prefill_window)

    def _drop_cancelled(self) -> None:
        for rows, kv in ((self.running, self.decoding), (self.pending, self.prefilling)):
            for i in range(len(rows) - 1, -1, -1):
                if rows[i].cancelled:
                    _remove(rows, kv, i)

    # -- admission ------------------------------------------------------------------------------------------
    def _fits(self, length: int) -> bool:
        """Whether one more sequence of `length` positions fits the budget, with every row padded to the
        longest (evicting prefix-cache entries to make room)."""
        longest = max([length, *self.decoding.lengths, *self.prefilling.lengths])
        per_row = self.layout.held_positions(longest + 1, self._decode_window)
        need = (self.rows + 1) * per_row
        prefix = self.prefix.held if self.prefix is not None else 0.0
        over = need + prefix - self.limits.max_positions
        if over > 0 and self.prefix is not None:
            self.prefix.evict(over)
            over = need + self.prefix.held - self.limits.max_positions
        return over <= 0

    def _admit(self) -> int:
        host, emitted = self.host, 0
        while host.waiting and self.rows < self.limits.max_rows:
            seq = host.waiting[0]
            if seq.cancelled:
                host.take_waiting()
                continue
            context = seq.context()
            if self.rows and not self._fits(len(context)):
                break  # it waits until rows leave; a lone sequence is always admitted
            host.take_waiting()
            if seq.sampler is None:
                host.prepare(seq)
            if seq.wants_prompt_scores:  # every prompt position's logits: prefilled alone, in one forward
                emitted += self._prefill_scored(seq)
                continue
            row = self.prefilling.add_row()
            self.pending.append(seq)
            cached = 0
            if self.prefix is not None:
                hit = self.prefix.match(context)
                if hit.length:
                    self.prefilling.import_prefix(row, hit.spans, hit.length)
                    cached = hit.length
            seq.admitted(cached)
        return emitted

    def _prefill_scored(self, seq: Sequence) -> int:
        kv = self._cache(self._prefill_window, rows=1)
        kv.add_row()
        context = seq.context()
        try:
            ids = torch.tensor([context], device=self.host.device)
            positions = torch.arange(len(context), device=self.host.device).unsqueeze(0)
            out = planned_forward(self.host.model, kv, ids, positions, [len(context)], self.how.kernels)
            logits = out.logits[0]
        except Exception as exc:  # e.g. out of memory on one long prompt: only that request fails
            log.exception("prefill failed")
            seq.push(exc)
            return 0
        self.host.score_prompt(seq, logits)
        seq.prefilled = len(context)
        self._finish_prefill(seq, kv, 0, logits[-1])
        return 1

    # -- prefill --------------------------------------------------------------------------------------------
    def _chunks(self) -> list[int]:
        """New tokens for the first prefilling rows this step, within the prompt-token and padding limits."""
        chunks: list[int] = []
        for seq in self.pending:
            left = PREFILL_TOKENS - sum(chunks)
            c = min(len(seq.context()) - seq.prefilled, left)
            if c <= 0 or (chunks and (len(chunks) + 1) * max(*chunks, c) > _PADDED_TOKENS):
                break
            chunks.append(c)
        return chunks

    def _prefill_step(self) -> int:
        chunks = self._chunks()
        if not chunks:
            return 0
        width, device = max(chunks), self.host.device
        ids = torch.zeros((len(chunks), width), dtype=torch.long, device=device)
        positions = torch.zeros_like(ids)
        for i, c in enumerate(chunks):
            seq = self.pending[i]
            start = seq.prefilled
            ids[i, width - c :] = torch.tensor(seq.context()[start : start + c], device=device)
            positions[i, width - c :] = torch.arange(start, start + c, device=device)
        try:
            out = planned_forward(
                self.host.model, self.prefilling, ids, positions, chunks, self.how.kernels, logits_to_keep=1
            )
        except Exception as exc:  # the rows of this forward fail; the running batch goes on
            log.exception("prefill failed")
            for i in range(len(chunks) - 1, -1, -1):
                self.pending[i].push(exc)
                _remove(self.pending, self.prefilling, i)
            return 0
        done = []
        for i, c in enumerate(chunks):
            seq = self.pending[i]
            seq.prefilled += c
            if seq.prefilled == len(seq.context()):
                done.append(i)
        emitted = 0
        for i in reversed(done):  # highest row first: removing a row moves the last one into it
            emitted += 1
            self._finish_prefill(self.pending[i], self.prefilling, i, out.logits[i, -1], pending=True)
        return emitted

    def _finish_prefill(self, seq: Sequence, kv: SlotKV, row: int, logits: Any, pending: bool = False) -> None:
        """A sequence's prompt is in `kv` row `row`: cache it, sample its first token, move it to decoding."""
        self._remember(seq, kv, row)
        assert seq.sampler is not None
        finished = self.host.accept(seq, sample_rows([seq.sampler], logits.unsqueeze(0))[0]) or seq.cancelled
        if not finished:
            self.decoding.take_row(kv, row)
            self.running.append(seq)
        if pending:
            _remove(self.pending, kv, row)

    def _remember(self, seq: Sequence, kv: SlotKV, row: int) -> None:
        """Put a row's cached positions into the prefix cache (the tree copies only what it lacks)."""
        if self.prefix is None:
            return
        tokens = seq.context()[: kv.lengths[row]]
        try:
            self.prefix.insert(tokens, RowSource(kv, row, self.window_keep))
        except Exception:  # e.g. out of memory for the copy: the cache is an optimisation, never a failure
            log.exception("could not add a prefix to the cache")

    # -- decode ---------------------------------------------------------------------------------------------
    def _decode_step(self) -> int:
        rows, kv, device = self.running, self.decoding, self.host.device
        ids = torch.tensor([[seq.generated[-1]] for seq in rows], device=device)
        positions = torch.tensor([[n] for n in kv.lengths], device=device)
        if self.compiled is not None:
            logits = self.compiled(kv, ids, positions)
        else:
            logits = planned_forward(self.host.model, kv, ids, positions, [1] * len(rows), self.how.kernels).logits
            logits = logits[:, -1]
        sampled = sample_rows([seq.sampler for seq in rows], logits)  # type: ignore[misc]
        finished = [i for i, (seq, s) in enumerate(zip(rows, sampled, strict=True)) if self.host.accept(seq, s)]
        for i in reversed(finished):
            self._remember(rows[i], kv, i)
            _remove(rows, kv, i)
        return len(sampled)

    def _enforce_budget(self) -> None:
        """Growing rows can push the batch past the budget: evict prefix entries, then preempt rows."""
        kv = self.decoding

        def over() -> float:
            grown = self.rows * self.layout.held_positions(
                max([0, *kv.lengths, *self.prefilling.lengths]) + 1, self._decode_window
            )
            prefix = self.prefix.held if self.prefix is not None else 0.0
            return grown + prefix - self.limits.max_positions

        if over() > 0 and self.prefix is not None:
            self.prefix.evict(over())
        evicted = 0
        while self.running and self.rows > 1 and over() > 0:
            seq = self.running[-1]
            _remove(self.running, kv, len(self.running) - 1)
            self.host.requeue(seq)
            evicted += 1
        if evicted:
            self.preemptions += evicted
            log.info("token budget reached: preempted %d sequences", evicted)


def _remove(rows: list[Sequence], kv: SlotKV, i: int) -> None:
    """Drop row i of a cache and its sequence list alike (the last row moves into its place)."""
    moved = kv.remove_row(i)
    if moved is not None:
        rows[i] = rows[moved]
    rows.pop()
