"""Hugging Face transformers engine: accelerate device maps, bitsandbytes 8-bit, GPTQ/AWQ checkpoints.

Generation runs on one dedicated thread that owns the model (forward passes never block the event
loop); each request streams its chunks back through an asyncio queue.  That thread batches
continuously: every request is prefilled alone as soon as the batch has room, then joins the running
batch, which advances all its sequences one token per forward pass; finished or aborted sequences
leave between steps.  The batch is bounded by `max_batch_size` rows and `max_batch_tokens` cached
positions (rows x padded width, see `kvbatch`).  Each sequence keeps its own sampler, seed, stops
and limits, so its output does not depend on its neighbours (greedy output in a batch equals greedy
output alone).  Models whose code cannot take a batched cache fall back to one sequence at a time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from llmstack.common.wire import SamplingParams, WorkerKind
from llmstack.services.engines.base import Chunk, EngineStats, TemplatedEngine
from llmstack.services.engines.hf.grammar import Grammars
from llmstack.services.engines.hf.kvbatch import BatchKV, cache_was_used, new_cache
from llmstack.services.engines.hf.loading import (
    EngineConfigError,
    HFEngineConfig,
    checkpoint_of,
    context_length_of,
    describe_load,
    eos_ids,
    plan_loading,
    resolve_device,
)
from llmstack.services.engines.hf.sampling import Sampled, SequenceSampler, prompt_logprobs, sample_rows
from llmstack.services.engines.text.decoding import IncrementalDetokenizer, StopStrings, TokenTexts
from llmstack.services.engines.text.templates import ChatRenderer

log = logging.getLogger("llmstack.engine.hf")


_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


# Prefill tokens per scheduler step before the running rows get their next decode step: a burst of
# arrivals must not stall streams already running for long.
_PREFILL_TOKENS_PER_STEP = 512


class _Sequence:
    """One generation: its inputs, its per-request state (engine thread only) and the queue the
    engine thread writes chunks to."""

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

    def take_chunk(self, finish: str | None = None) -> Chunk:
        chunk = Chunk(self.pending_text, self.pending_tokens, finish, self.pending_logprobs, self.prompt_logprobs)
        if finish is not None and self.stops is not None:
            chunk.stop_sequence = self.stops.matched
        self.pending_text, self.pending_tokens, self.prompt_logprobs = "", 0, None
        if self.pending_logprobs is not None:
            self.pending_logprobs = []
        return chunk

    def push(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def context(self) -> list[int]:
        """What a prefill feeds: the prompt plus anything generated before the sequence was preempted."""
        return self.prompt_ids + self.generated if self.generated else self.prompt_ids

    @property
    def position(self) -> int:
        """Position id of the newest token (the next decode step's input)."""
        return len(self.prompt_ids) + len(self.generated) - 1


@dataclass
class HFEngineStats(EngineStats):
    batch_size: int = 0  # sequences in the running batch right now
    max_batch_size: int = 0
    batched: bool = True  # False when the model only supports sequential generation
    preemptions: int = 0  # rows evicted (and later resumed) to keep within the token budget, since start


class HFEngine(TemplatedEngine):
    name = "transformers"

    def __init__(self, cfg: HFEngineConfig) -> None:
        if cfg.max_batch_size < 1 or cfg.max_batch_tokens < 1:
            raise EngineConfigError("--max-batch-size and --max-batch-tokens must be at least 1")
        self.cfg = cfg
        self.kind: WorkerKind = "chat"
        self.context_length = 2048
        self.model: Any = None
        self.tokenizer: Any = None
        self.renderer: ChatRenderer | None = None
        self.eos_ids: set[int] = set()
        self.vocab_size = 0
        self._grammars: Grammars | None = None
        self._token_texts: TokenTexts | None = None
        # Unbounded by itself, but only the worker's admission limit of requests can be in it.
        self._pending: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()  # engine thread only
        self._rows: list[_Sequence] = []  # the running batch, row i of the KV cache; engine thread only
        self._kv: BatchKV | None = None
        self._num_layers = 0
        self._batched = True
        self._logits_to_keep = True
        self._preemptions = 0
        # Waiting = submitted - taken; each counter has one writer (event loop / engine thread), so
        # neither needs a lock (a shared `+=` from two threads could lose updates).
        self._submitted = 0
        self._taken = 0
        self._speed = 0.0
        self._thread: threading.Thread | None = None
        self._embed_lock = threading.Lock()
        self._embed_pool: ThreadPoolExecutor | None = None

    # -- loading ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        # The thread that loads the model (and runs the batching check's forward passes) is the one that
        # generates: each thread that calls into torch's OpenMP gets its own pool of OpenMP workers, and
        # while a second pool lives (e.g. an idle executor thread that loaded the model), every parallel
        # region of the generation thread runs slower (measured: a 50-token prefill of the benchmark
        # model 60 -> 78 ms on 2 cores).  Embedding models have no generation thread; theirs ends here.
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._load_then_loop, args=(loop, loaded), name="hf-generate", daemon=True
        )
        self._thread.start()
        await loaded
        if self.kind != "chat":
            self._thread = None

    def _load_then_loop(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        def settle(exc: BaseException | None) -> None:
            if loaded.done():  # start() was cancelled
                return
            if exc is None:
                loaded.set_result(None)
            else:
                loaded.set_exception(exc)

        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            loop.call_soon_threadsafe(settle, exc)
            return
        loop.call_soon_threadsafe(settle, None)
        if self.kind == "chat":
            self._loop()

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        common = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.revision:
            common["revision"] = cfg.revision
        device = resolve_device(cfg.device)
        checkpoint = checkpoint_of(cfg, device)  # a GGUF file: its converted copy
        model_config = AutoConfig.from_pretrained(checkpoint.path, **common)
        archs = getattr(model_config, "architectures", None) or []
        self.kind = "chat" if any(a.endswith(_GENERATIVE_SUFFIXES) for a in archs) else "embedding"
        plan = plan_loading(cfg, model_config, device)
        log.info("loading %s (%s) on %s with %s", checkpoint.path, self.kind, device, describe_load(plan.kwargs))
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path, **common)
        auto = AutoModelForCausalLM if self.kind == "chat" else AutoModel
        model = auto.from_pretrained(checkpoint.path, **plan.kwargs)
        if plan.move_to:
            model = model.to(plan.move_to)
        model.eval()
        self.model = model
        self.device = torch.device(plan.move_to or ("cpu" if device == "cpu" else model.device))
        self.context_length = context_length_of(model_config, self.tokenizer)
        if self.kind == "chat":
            self.renderer = ChatRenderer(self.tokenizer, cfg.model_path, cfg.conv_template, *checkpoint.hints)
            self.eos_ids = eos_ids(model, self.tokenizer)
            self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
            self._token_texts = TokenTexts(self.tokenizer)
            reason = self._batching_unsupported()
            self._batched = reason is None
            if reason is not None:
                log.warning("continuous batching is off for this model (%s): requests run one at a time", reason)
        log.info(
            "loaded in %.1fs: context %d, template %s, eos %s, turn ends %s, %s",
            time.perf_counter() - started,
            self.context_length,
            self.renderer.name if self.renderer else "-",
            sorted(self.eos_ids),
            self.renderer.end_of_turn if self.renderer else {},
            f"batching up to {cfg.max_batch_size} sequences / {cfg.max_batch_tokens} cached tokens"
            if self._batched
            else "sequential generation",
        )

    def _batching_unsupported(self) -> str | None:
        """Why the batched path cannot run this model, or None.  Checked once, by running it: a tiny
        two-row batch must reproduce the logits of the same sequence run alone."""
        import torch
        from transformers.cache_utils import DynamicCache, DynamicLayer

        text_config = self.model.config.get_text_config(decoder=True)
        self._num_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
        if self._num_layers <= 0:
            return "its config does not say how many layers it has"
        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # remote code with a config transformers' cache cannot read
            layers = []
        if any(type(layer) is not DynamicLayer for layer in layers):
            return "it has sliding-window or recurrent cache layers"
        short, long = [1, 2], [3, 4, 5]
        try:
            with torch.inference_mode():
                solo_cache, solo_logits = self._prefill(long)
                if not cache_was_used(solo_cache):
                    return "its code keeps its own legacy cache"
                kv = BatchKV(self._num_layers)
                kv.merge([self._prefill(short)[0], solo_cache])
                ids = torch.tensor([[6], [6]], device=self.device)
                out = self._decode_forward(kv, ids, torch.tensor([[len(short)], [len(long)]], device=self.device))
                alone_cache, _ = self._prefill(long)
                alone = self.model(input_ids=ids[:1], past_key_values=alone_cache, use_cache=True).logits[0, -1]
        except Exception as exc:
            return f"a batched forward pass failed: {type(exc).__name__}: {exc}"
        del solo_logits
        batched = out.logits[1, -1].float()
        if not torch.allclose(batched, alone.float(), rtol=1e-2, atol=1e-2 * float(alone.abs().max()) + 1e-3):
            return "its batched output differs from its solo output (it ignores the attention mask or positions)"
        return None

    async def close(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
        if self._embed_pool is not None:
            self._embed_pool.shutdown(wait=False)

    # -- generation: request side -------------------------------------------------------------------------
    def check(self, params: SamplingParams) -> None:
        self.check_logit_bias(params, self.vocab_size)
        if params.structure is not None:
            self._grammar_compiler().compile(params.structure)  # compiled once; cached for _prepare

    def _grammar_compiler(self) -> Grammars:
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        seq = _Sequence(prompt_ids, params, asyncio.get_running_loop())
        self._submitted += 1
        self._pending.put(seq)
        try:
            while True:
                item = await seq.out.get()
                # chunks that queued up while the consumer was busy leave as one (never waiting for more)
                while isinstance(item, Chunk) and item.finish_reason is None and not seq.out.empty():
                    following = seq.out.get_nowait()
                    if isinstance(following, BaseException):
                        yield item
                        item = following
                        break
                    item = item.then(following)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # the engine thread drops it before its next step

    def stats(self) -> HFEngineStats:
        rows = len(self._rows)
        return HFEngineStats(
            waiting=max(0, self._submitted - self._taken),
            running=rows,
            tokens_per_s=self._speed,
            batch_size=rows,
            max_batch_size=self.cfg.max_batch_size if self._batched else 1,
            batched=self._batched,
            preemptions=self._preemptions,
        )

    # -- generation: engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                if not self._rows and not self._waiting:
                    first = self._pending.get()  # idle: block until a request arrives
                    if first is None:
                        break
                    self._waiting.append(first)
                if not self._drain_pending():
                    break
                started = time.perf_counter()
                if self._batched:
                    emitted = self._step()
                else:
                    emitted = self._run_next_alone()
                self._note_speed(emitted, time.perf_counter() - started)
        stopped = RuntimeError("the engine is shutting down")
        for seq in [*self._rows, *self._waiting]:
            seq.push(stopped)
        self._rows, self._kv = [], None

    def _drain_pending(self) -> bool:
        """Move newly submitted sequences to the waiting line; False once close() asked us to stop."""
        while True:
            try:
                seq = self._pending.get_nowait()
            except queue.Empty:
                return True
            if seq is None:
                return False
            self._waiting.append(seq)

    def _take_waiting(self) -> _Sequence:
        self._taken += 1
        return self._waiting.popleft()

    def _note_speed(self, tokens: int, elapsed: float) -> None:
        if tokens and elapsed > 0:
            rate = tokens / elapsed
            self._speed = rate if self._speed == 0 else 0.9 * self._speed + 0.1 * rate

    def _prepare(self, seq: _Sequence) -> None:
        params = seq.params
        seq.limit = params.max_tokens or max(1, self.context_length - len(seq.prompt_ids))
        seq.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        constraint = self._grammar_compiler().constraint(params.structure) if params.structure else None
        seq.sampler = SequenceSampler(params, seq.prompt_ids, self.device, constraint)
        seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)
        seq.stops = StopStrings(params.stop)

    def _accept(self, seq: _Sequence, sampled: Sampled) -> bool:
        """Record a sampled token, stream what is due; True when the sequence is finished."""
        assert seq.detok is not None and seq.stops is not None and seq.sampler is not None
        token = sampled.token
        seq.generated.append(token)
        seq.pending_tokens += 1
        finish: str | None = None
        constraint = seq.sampler.constraint
        grammar_done = constraint is not None and (not constraint.accept(token) or constraint.finished)
        delta = ""
        stop_string = False
        if token in seq.stop_ids:
            finish = "stop"
        else:
            delta = seq.detok.add(token)
            text, stop_string = seq.stops.feed(delta)
            seq.pending_text += text
            if stop_string or grammar_done:
                finish = "stop"
            elif len(seq.generated) >= seq.limit:
                finish = "length"
        if finish is not None and not stop_string:  # the sequence ended: release held-back text
            tail, hit = seq.stops.feed(seq.detok.flush())
            delta += tail
            seq.pending_text += tail if hit else tail + seq.stops.flush()
        if seq.pending_logprobs is not None:
            assert self._token_texts is not None
            text = "" if token in seq.stop_ids else delta
            seq.pending_logprobs.append(self._token_texts.entry(token, sampled.logprob, sampled.top, text))
        if finish is not None:
            seq.push(seq.take_chunk(finish))
            return True
        if seq.pending_tokens >= max(1, self.cfg.stream_interval) and seq.pending_text:
            seq.push(seq.take_chunk())
        return False

    def _prefill(self, ids: list[int], all_logits: bool = False) -> tuple[Any, Any]:
        """Run one sequence's context alone into a fresh cache; its last position's logits (every
        position's, for prompt log-probabilities, with `all_logits`)."""
        import torch

        cache = new_cache(self._num_layers)
        input_ids = torch.tensor([ids], device=self.device)
        if all_logits:
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            return cache, out.logits[0]
        if self._logits_to_keep:
            try:  # only the last position's logits: a long prompt x a large vocabulary is a lot of memory
                out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                return cache, out.logits[0, -1]
            except TypeError:  # remote code without the argument
                self._logits_to_keep = False
                cache = new_cache(self._num_layers)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return cache, out.logits[0, -1]

    def _step(self) -> int:
        """One scheduler iteration: drop aborted rows, admit and prefill newcomers, one decode step
        for the whole batch, then keep the cache within the token budget.  Returns tokens produced."""
        if self._kv is None:
            self._kv = BatchKV(self._num_layers)
        self._keep_rows([i for i, seq in enumerate(self._rows) if not seq.cancelled])
        emitted = 0
        try:
            emitted += self._admit()
            if self._rows:
                emitted += self._decode()
        except Exception as exc:  # a failed batch forward: every running sequence gets the error
            log.exception("batched generation failed")
            for seq in self._rows:
                seq.push(exc)
            self._rows, self._kv = [], BatchKV(self._num_layers)
            return emitted
        self._enforce_budget()
        return emitted

    def _admit(self) -> int:
        kv = self._kv
        assert kv is not None
        budget, max_rows = self.cfg.max_batch_tokens, self.cfg.max_batch_size
        joining: list[_Sequence] = []
        caches: list[Any] = []
        prefilled = emitted = 0
        width = kv.width
        while self._waiting and len(self._rows) + len(joining) < max_rows:
            seq = self._waiting[0]
            if seq.cancelled:
                self._take_waiting()
                continue
            context = seq.context()
            rows_after, width_after = len(self._rows) + len(joining) + 1, max(width, len(context))
            if rows_after > 1 and rows_after * width_after > budget:
                break  # it waits until rows leave; a lone sequence is always admitted
            if joining and prefilled + len(context) > _PREFILL_TOKENS_PER_STEP:
                break  # let the running rows take a decode step before more prefill
            self._take_waiting()
            prefilled += len(context)
            if seq.sampler is None:
                self._prepare(seq)
            assert seq.sampler is not None
            try:
                cache, logits = self._prefill_sequence(seq, context)
            except Exception as exc:  # e.g. out of memory on one long prompt: only that request fails
                log.exception("prefill failed")
                seq.push(exc)
                continue
            emitted += 1
            if self._accept(seq, sample_rows([seq.sampler], logits.unsqueeze(0))[0]) or seq.cancelled:
                continue
            joining.append(seq)
            caches.append(cache)
            width = width_after
        if joining:
            try:
                kv.merge(caches)
            except Exception as exc:  # e.g. out of memory: the newcomers are not rows yet, tell them here
                for seq in joining:
                    seq.push(exc)
                raise
            self._rows.extend(joining)
        return emitted

    def _prefill_sequence(self, seq: _Sequence, context: list[int]) -> tuple[Any, Any]:
        """A sequence's prefill; the first one also scores the prompt when its request asks for that."""
        top = seq.params.prompt_logprobs
        if top is None or seq.generated:
            return self._prefill(context)
        cache, logits = self._prefill(context, all_logits=True)
        seq.prompt_logprobs = self._prompt_entries(seq.prompt_ids, logits, top)
        return cache, logits[-1]

    def _prompt_entries(self, ids: list[int], logits: Any, top: int) -> list[dict[str, Any]]:
        assert self._token_texts is not None
        scored = prompt_logprobs(logits, ids, top)
        entries = [self._token_texts.entry(ids[0], None, None)]
        entries += [self._token_texts.entry(t, lp, alts) for t, (lp, alts) in zip(ids[1:], scored, strict=True)]
        return entries

    def _decode(self) -> int:
        import torch

        kv = self._kv
        assert kv is not None
        rows = self._rows
        ids = torch.tensor([[seq.generated[-1]] for seq in rows], device=self.device)
        positions = torch.tensor([[seq.position] for seq in rows], device=self.device)
        out = self._decode_forward(kv, ids, positions)
        kv.advance()
        sampled = sample_rows([seq.sampler for seq in rows], out.logits[:, -1])  # type: ignore[misc]
        keep = [i for i, (seq, s) in enumerate(zip(rows, sampled, strict=True)) if not self._accept(seq, s)]
        self._keep_rows(keep)
        return len(rows)

    def _decode_forward(self, kv: BatchKV, ids: Any, positions: Any) -> Any:
        """One token per row through the batch's cache (each row at its own position)."""
        return self.model(
            input_ids=ids,
            attention_mask=kv.step_mask(),
            position_ids=positions,
            past_key_values=kv.cache,
            use_cache=True,
        )

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        assert self._kv is not None
        self._kv.select(keep)
        self._rows = [self._rows[i] for i in keep]

    def _enforce_budget(self) -> None:
        """Growing rows can push the padded cache past the token budget: preempt the newest rows (they
        go back to the front of the line and are prefilled again, prompt plus output, when room frees)."""
        kv = self._kv
        assert kv is not None
        rows = len(self._rows)
        keep = rows
        while keep > 1 and keep * (kv.width + 1) > self.cfg.max_batch_tokens:
            keep -= 1
        if keep == rows:
            return
        evicted = self._rows[keep:]
        log.info("token budget reached: preempting %d of %d sequences", len(evicted), rows)
        self._keep_rows(list(range(keep)))
        self._preemptions += len(evicted)
        for seq in reversed(evicted):
            self._waiting.appendleft(seq)
            self._taken -= 1

    def _run_next_alone(self) -> int:
        """Sequential fallback for models the batched path cannot drive: one sequence to completion,
        through the model's own cache object."""
        import torch

        seq = self._take_waiting()
        if seq.cancelled:
            return 0
        self._rows = [seq]
        try:
            self._prepare(seq)
            assert seq.sampler is not None
            out = self.model(input_ids=torch.tensor([seq.prompt_ids], device=self.device), use_cache=True)
            if seq.params.prompt_logprobs is not None:
                seq.prompt_logprobs = self._prompt_entries(seq.prompt_ids, out.logits[0], seq.params.prompt_logprobs)
            while not self._accept(seq, sample_rows([seq.sampler], out.logits[:, -1])[0]) and not seq.cancelled:
                token = torch.tensor([[seq.generated[-1]]], device=self.device)
                out = self.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        except Exception as exc:  # surfaced to the request as a typed error
            log.exception("generation failed")
            seq.push(exc)
        finally:
            self._rows = []
        return len(seq.generated)

    # -- embeddings ----------------------------------------------------------------------------------------
    async def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        # always the same thread (one OpenMP pool, see `start`), not whichever executor thread is free
        if self._embed_pool is None:
            self._embed_pool = ThreadPoolExecutor(1, thread_name_prefix="hf-embed")
        return await asyncio.get_running_loop().run_in_executor(self._embed_pool, self._embed, texts, truncate)

    def _embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        import torch

        limit = self.context_length
        vectors: list[list[float]] = []
        total_tokens = 0
        with self._embed_lock, torch.inference_mode():
            for text in texts:
                ids = self.encode(text)
                if len(ids) > limit and truncate:
                    ids = ids[:limit]
                total_tokens += len(ids)
                # long inputs without truncation: mean of chunk embeddings weighted by chunk length
                chunks = [ids[i : i + limit] for i in range(0, len(ids), limit)] or [[]]
                acc = None
                for chunk in chunks:
                    pooled = self._mean_pool(chunk) * len(chunk)
                    acc = pooled if acc is None else acc + pooled
                vec = torch.nn.functional.normalize(acc, dim=-1)
                vectors.append(vec.tolist())
        return vectors, total_tokens

    def _mean_pool(self, ids: list[int]) -> Any:
        import torch

        input_ids = torch.tensor([ids], device=self.device)
        mask = torch.ones_like(input_ids)
        if self.kind == "chat":
            hidden = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden[0].float().mean(dim=0)
