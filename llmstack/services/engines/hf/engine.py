"""Hugging Face transformers engine: accelerate device maps, bitsandbytes 8-bit, GPTQ/AWQ checkpoints.

Generation runs on one dedicated thread that owns the model (forward passes never block the event
loop); each request streams its chunks back through an asyncio queue.  That thread batches
continuously (`batcher`): waiting prompts are prefilled together, a long one chunk by chunk, and join
the running batch, which advances all its sequences one token per forward pass; finished or aborted
sequences leave between steps.  Full-attention, sliding-window and mixed models batch alike (`slots`,
`layout`), and a prompt that starts like an earlier one reuses its cached keys/values (`prefix`).  The
batch is bounded by `max_batch_size` rows and `max_batch_tokens` cached positions.  Each sequence
keeps its own sampler, seed, stops and limits, so its output does not depend on its neighbours (greedy
output in a batch equals greedy output alone).  Models whose code cannot take the batched cache (found
at load, `probe`) fall back to one sequence at a time.
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
from llmstack.services.engines.hf.batcher import Batcher, BatchLimits
from llmstack.services.engines.hf.compiled import CHOICES as COMPILE_CHOICES
from llmstack.services.engines.hf.compiled import decoder_parameters, wanted
from llmstack.services.engines.hf.grammar import Grammars
from llmstack.services.engines.hf.kernels import Kernel
from llmstack.services.engines.hf.lm_head import vocabulary_major_head
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
from llmstack.services.engines.hf.packing import pack_linear_weights
from llmstack.services.engines.hf.probe import Batchable, probe
from llmstack.services.engines.hf.sampling import Sampled, SequenceSampler, prompt_logprobs, sample_rows
from llmstack.services.engines.hf.sequence import Sequence
from llmstack.services.engines.text.decoding import IncrementalDetokenizer, StopStrings, TokenTexts
from llmstack.services.engines.text.templates import ChatRenderer

log = logging.getLogger("llmstack.engine.hf")


_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass
class HFEngineStats(EngineStats):
    batch_size: int = 0  # sequences in the running batch right now
    max_batch_size: int = 0
    batched: bool = True  # False when the model only supports sequential generation
    preemptions: int = 0  # rows evicted (and later resumed) to keep within the token budget, since start
    prefilling: int = 0  # sequences admitted whose prompt is still being prefilled
    prefix_caching: bool = False
    prefix_cache_positions: float = 0.0  # cache positions the prefix cache holds now


class HFEngine(TemplatedEngine):
    name = "transformers"

    def __init__(self, cfg: HFEngineConfig) -> None:
        if cfg.max_batch_size < 1 or cfg.max_batch_tokens < 1:
            raise EngineConfigError("--max-batch-size and --max-batch-tokens must be at least 1")
        if cfg.attention_kernel not in tuple(Kernel):
            raise EngineConfigError(f"--attention-kernel {cfg.attention_kernel!r}: choose auto, sdpa or matmul")
        if cfg.compile_decode not in COMPILE_CHOICES:
            raise EngineConfigError(f"--compile-decode {cfg.compile_decode!r}: choose auto, on or off")
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
        self._pending: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()  # engine thread only
        self._alone: Sequence | None = None  # the sequence of the sequential fallback
        self._batcher: Batcher | None = None
        self._batchable: Batchable | None = None
        self._compiled = False  # decode steps through a compiled graph (`compiled`)
        self._parameters = 0
        self._batched = True
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
        self._parameters = decoder_parameters(model)  # before packing empties the linears
        packed = pack_linear_weights(model, self.device)
        if packed:
            dtype = str(model.dtype).removeprefix("torch.")
            log.info("%s weights of %d linear layers packed for oneDNN", dtype, packed)
        head = vocabulary_major_head(model)
        if head is not None:
            log.info("LM head at decode sizes: %s", head.describe())
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
            self._describe_batching(),
        )

    def _describe_batching(self) -> str:
        if not self._batched or self._batchable is None:
            return "sequential generation"
        cfg = self.cfg
        return (
            f"batching up to {cfg.max_batch_size} sequences / {cfg.max_batch_tokens} cached tokens "
            f"({self._batchable.layout.describe()}), prefix caching {'on' if cfg.prefix_caching else 'off'}, "
            f"attention {self._batchable.kernels.describe()}, "
            f"decode steps {'compiled' if self._compiled else 'eager'}"
        )

    def _batching_unsupported(self) -> str | None:
        """Why the batched path cannot run this model, or None and the batcher set up (checked once, by
        running it: `probe`)."""
        import torch

        with torch.inference_mode():
            how = probe(self.model, self.device, Kernel(self.cfg.attention_kernel))
        if isinstance(how, str):
            return how
        self._batchable = how
        limits = BatchLimits(self.cfg.max_batch_size, self.cfg.max_batch_tokens)
        self._batcher = Batcher(self, how, limits, self.cfg.prefix_caching)
        if wanted(self.cfg.compile_decode, self._parameters, self.device):
            self._compiled = self._batcher.compile_decode()
        return None

    async def close(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            # the current step finishes first; a thread still inside torch at interpreter exit aborts it
            await asyncio.to_thread(self._thread.join, 30)
        if self._embed_pool is not None:
            self._embed_pool.shutdown(wait=False)

    # -- generation: request side -------------------------------------------------------------------------
    def check(self, params: SamplingParams) -> None:
        self.check_logit_bias(params, self.vocab_size)
        if params.structure is not None:
            self._grammar_compiler().compile(params.structure)  # compiled once; cached for prepare

    def _grammar_compiler(self) -> Grammars:
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        seq = Sequence(prompt_ids, params, asyncio.get_running_loop())
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
        batcher = self._batcher
        running = len(batcher.running) if batcher is not None else int(self._alone is not None)
        prefilling = len(batcher.pending) if batcher is not None else 0
        prefix = batcher.prefix if batcher is not None else None
        return HFEngineStats(
            waiting=max(0, self._submitted - self._taken),
            running=running + prefilling,
            tokens_per_s=self._speed,
            batch_size=running,
            max_batch_size=self.cfg.max_batch_size if self._batched else 1,
            batched=self._batched,
            preemptions=batcher.preemptions if batcher is not None else 0,
            prefilling=prefilling,
            prefix_caching=prefix is not None,
            prefix_cache_queried_tokens=prefix.stats.queried_tokens if prefix is not None else None,
            prefix_cache_hit_tokens=prefix.stats.hit_tokens if prefix is not None else None,
            prefix_cache_positions=prefix.held if prefix is not None else 0.0,
        )

    # -- generation: engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                batcher = self._batcher
                if not self.waiting and (batcher is None or not batcher.rows):
                    first = self._pending.get()  # idle: block until a request arrives
                    if first is None:
                        break
                    self.waiting.append(first)
                if not self._drain_pending():
                    break
                started = time.perf_counter()
                emitted = batcher.step() if batcher is not None else self._run_next_alone()
                self._note_speed(emitted, time.perf_counter() - started)
        if self._batcher is not None:
            self._batcher.fail_all(RuntimeError("the engine is shutting down"), reset=False)
            self._batcher = None
        for seq in self.waiting:
            seq.push(RuntimeError("the engine is shutting down"))

    def _drain_pending(self) -> bool:
        """Move newly submitted sequences to the waiting line; False once close() asked us to stop."""
        while True:
            try:
                seq = self._pending.get_nowait()
            except queue.Empty:
                return True
            if seq is None:
                return False
            self.waiting.append(seq)

    def take_waiting(self) -> Sequence:
        self._taken += 1
        return self.waiting.popleft()

    def requeue(self, seq: Sequence) -> None:
        """A preempted sequence goes back to the front of the line."""
        self.waiting.appendleft(seq)
        self._taken -= 1

    def _note_speed(self, tokens: int, elapsed: float) -> None:
        if tokens and elapsed > 0:
            rate = tokens / elapsed
            self._speed = rate if self._speed == 0 else 0.9 * self._speed + 0.1 * rate

    def prepare(self, seq: Sequence) -> None:
        params = seq.params
        seq.limit = params.max_tokens or max(1, self.context_length - len(seq.prompt_ids))
        seq.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        constraint = self._grammar_compiler().constraint(params.structure) if params.structure else None
        seq.sampler = SequenceSampler(params, seq.prompt_ids, self.device, constraint)
        seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)
        seq.stops = StopStrings(params.stop)

    def accept(self, seq: Sequence, sampled: Sampled) -> bool:
        return self._accept(seq, sampled)

    def _accept(self, seq: Sequence, sampled: Sampled) -> bool:
        """Record a sampled token, stream what is due; True when the sequence is finished."""
        assert self._token_texts is not None
        return seq.accept(sampled, self._token_texts, self.cfg.stream_interval)

    def score_prompt(self, seq: Sequence, logits: Any) -> None:
        """The prompt's log-probabilities from its prefill's every-position logits (first chunk only)."""
        top = seq.params.prompt_logprobs
        if top is not None:
            seq.prompt_logprobs = self._prompt_entries(seq.prompt_ids, logits, top)

    def _prompt_entries(self, ids: list[int], logits: Any, top: int) -> list[dict[str, Any]]:
        assert self._token_texts is not None
        scored = prompt_logprobs(logits, ids, top)
        entries = [self._token_texts.entry(ids[0], None, None)]
        entries += [self._token_texts.entry(t, lp, alts) for t, (lp, alts) in zip(ids[1:], scored, strict=True)]
        return entries

    def _run_next_alone(self) -> int:
        """Sequential fallback for models the batched path cannot drive: one sequence to completion,
        through the model's own cache object."""
        import torch

        seq = self.take_waiting()
        if seq.cancelled:
            return 0
        self._alone = seq
        try:
            self.prepare(seq)
            assert seq.sampler is not None
            out = self.model(input_ids=torch.tensor([seq.prompt_ids], device=self.device), use_cache=True)
            if seq.params.prompt_logprobs is not None:
                self.score_prompt(seq, out.logits[0])
            while not self._accept(seq, sample_rows([seq.sampler], out.logits[:, -1])[0]) and not seq.cancelled:
                token = torch.tensor([[seq.generated[-1]]], device=self.device)
                out = self.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        except Exception as exc:  # surfaced to the request as a typed error
            log.exception("generation failed")
            seq.push(exc)
        finally:
            self._alone = None
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
