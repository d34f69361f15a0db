"""Hugging Face transformers engine: accelerate device maps, bitsandbytes 8-bit, GPTQ/AWQ checkpoints.

Generation runs on one dedicated thread that owns the model (forward passes never block the event
loop); each request streams its chunks back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest
from ..wire import SamplingParams, WorkerKind
from .base import Chunk, Engine, EngineStats
from .sampling import SequenceSampler
from .templates import ChatRenderer
from .textstream import IncrementalDetokenizer, StopStrings

log = logging.getLogger("llmstack.engine.hf")

_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "model_max_length", "n_positions")


class EngineConfigError(ValueError):
    """A combination of loading options that cannot work; the message says what to change."""


@dataclass
class HFEngineConfig:
    model_path: str
    model_names: list[str] = field(default_factory=list)
    revision: str | None = None
    device: str = "auto"  # cpu | cuda | mps | auto
    num_gpus: int = 1
    max_gpu_memory: str | None = None
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    load_8bit: bool = False
    cpu_offloading: bool = False
    conv_template: str | None = None
    trust_remote_code: bool = False
    stream_interval: int = 1
    seed: int | None = None
    embed_in_truncate: bool = False
    gptq: dict[str, Any] = field(default_factory=dict)  # wbits, groupsize, act_order, ckpt
    awq: dict[str, Any] = field(default_factory=dict)  # wbits, groupsize, ckpt


@dataclass
class LoadPlan:
    """What `from_pretrained` gets, decided before any weight is read (and unit-testable)."""

    device: str
    kwargs: dict[str, Any]
    move_to: str | None  # model.to(...) after loading, when no device_map places it


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError("--device cuda was asked for but no CUDA GPU is visible to torch")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise EngineConfigError("--device mps was asked for but MPS is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise EngineConfigError(f"--dtype {name!r}: choose auto, float32, float16 or bfloat16") from None


def _check_prequantized(cfg: HFEngineConfig, model_config: Any) -> None:
    """GPTQ/AWQ weights load through transformers' own quantizers from the checkpoint's
    `quantization_config`; the tutorial's --gptq-*/--awq-* flags are checked against it."""
    for method, flags in (("gptq", cfg.gptq), ("awq", cfg.awq)):
        given = {k: v for k, v in flags.items() if v not in (None, False, "")}
        if not given:
            continue
        if cfg.load_8bit:
            raise EngineConfigError(f"--load-8bit cannot be combined with --{method}-* (weights are already quantized)")
        if given.get("ckpt"):
            raise EngineConfigError(
                f"--{method}-ckpt (a separate quantized checkpoint) is not supported: transformers loads "
                f"{method.upper()} weights from a checkpoint directory whose config.json has a "
                "quantization_config; point --model-path at that directory"
            )
        qc = getattr(model_config, "quantization_config", None)
        qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
        if not qc or qc.get("quant_method") != method:
            raise EngineConfigError(
                f"--{method}-* flags were given but {cfg.model_path} is not a {method.upper()} checkpoint "
                "(its config.json has no matching quantization_config)"
            )
        if "wbits" in given and qc.get("bits") not in (None, given["wbits"]):
            raise EngineConfigError(
                f"--{method}-wbits {given['wbits']} disagrees with the checkpoint's {qc['bits']} bits"
            )
        if "groupsize" in given and qc.get("group_size") not in (None, given["groupsize"]):
            raise EngineConfigError(
                f"--{method}-groupsize {given['groupsize']} disagrees with the checkpoint's {qc['group_size']}"
            )


def _check_quant_packages(model_config: Any) -> None:
    from transformers.utils import is_gptqmodel_available, is_llm_awq_available

    qc = getattr(model_config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    method = (qc or {}).get("quant_method")
    if method == "gptq" and not is_gptqmodel_available():
        raise EngineConfigError("this is a GPTQ checkpoint: install the `gptqmodel` package to load it")
    if method == "awq" and not is_llm_awq_available():
        raise EngineConfigError("this is an AWQ checkpoint: install the `autoawq` package to load it")


def plan_loading(cfg: HFEngineConfig, model_config: Any, device: str) -> LoadPlan:
    if cfg.cpu_offloading and not cfg.load_8bit:
        raise EngineConfigError("--cpu-offloading only works with --load-8bit (it offloads 8-bit layers to CPU)")
    if cfg.load_8bit and device == "mps":
        raise EngineConfigError("--load-8bit (bitsandbytes) does not support --device mps")
    if cfg.num_gpus > 1 and device != "cuda":
        raise EngineConfigError(f"--num-gpus {cfg.num_gpus} needs --device cuda (got {device})")
    _check_prequantized(cfg, model_config)
    _check_quant_packages(model_config)

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "dtype": _torch_dtype(cfg.dtype, device)}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    move_to: str | None = None
    max_memory: dict[Any, str] | None = None
    if device == "cuda" and (cfg.num_gpus > 1 or cfg.max_gpu_memory or cfg.cpu_offloading):
        per_gpu = cfg.max_gpu_memory
        if per_gpu is None:
            import torch

            per_gpu = f"{int(torch.cuda.get_device_properties(0).total_memory * 0.85 / 2**30)}GiB"
        max_memory = {i: per_gpu for i in range(cfg.num_gpus)}
        if cfg.cpu_offloading:
            max_memory["cpu"] = "1000GiB"
    if cfg.load_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cfg.cpu_offloading
        )
        kwargs["device_map"] = "cpu" if device == "cpu" else "auto"
        if device == "cpu":
            kwargs["dtype"] = _torch_dtype("float32" if cfg.dtype == "auto" else cfg.dtype, device)
    elif max_memory is not None:
        kwargs["device_map"] = "auto"
    else:
        move_to = device
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    return LoadPlan(device=device, kwargs=kwargs, move_to=move_to)


def context_length_of(model_config: Any, tokenizer: Any | None = None) -> int:
    for key in _CONTEXT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            scaling = getattr(model_config, "rope_scaling", None) or {}
            factor = scaling.get("factor") if isinstance(scaling, dict) else None
            length = int(value * factor) if isinstance(factor, int | float) and factor > 1 else value
            model_max = getattr(tokenizer, "model_max_length", None)
            if isinstance(model_max, int) and 0 < model_max < length:
                length = model_max
            return length
    return 2048


class _Sequence:
    """One generation: its inputs, sampler and the queue the engine thread writes chunks to."""

    __slots__ = ("prompt_ids", "params", "out", "loop", "cancelled")

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.out: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.cancelled = False

    def push(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class HFEngine(Engine):
    name = "transformers"

    def __init__(self, cfg: HFEngineConfig) -> None:
        self.cfg = cfg
        self.kind: WorkerKind = "chat"
        self.context_length = 2048
        self.model: Any = None
        self.tokenizer: Any = None
        self.renderer: ChatRenderer | None = None
        self.eos_ids: set[int] = set()
        self._pending: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._waiting = 0
        self._running = 0
        self._speed = 0.0
        self._thread: threading.Thread | None = None
        self._embed_lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        if self.kind == "chat":
            self._thread = threading.Thread(target=self._loop, name="hf-generate", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        common = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.revision:
            common["revision"] = cfg.revision
        model_config = AutoConfig.from_pretrained(cfg.model_path, **common)
        archs = getattr(model_config, "architectures", None) or []
        self.kind = "chat" if any(a.endswith(_GENERATIVE_SUFFIXES) for a in archs) else "embedding"
        device = resolve_device(cfg.device)
        plan = plan_loading(cfg, model_config, device)
        log.info("loading %s (%s) on %s with %s", cfg.model_path, self.kind, device, _describe(plan.kwargs))
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, **common)
        auto = AutoModelForCausalLM if self.kind == "chat" else AutoModel
        model = auto.from_pretrained(cfg.model_path, **plan.kwargs)
        if plan.move_to:
            model = model.to(plan.move_to)
        model.eval()
        self.model = model
        self.device = torch.device(plan.move_to or ("cpu" if device == "cpu" else model.device))
        self.context_length = context_length_of(model_config, self.tokenizer)
        if self.kind == "chat":
            self.renderer = ChatRenderer(self.tokenizer, cfg.model_path, cfg.conv_template)
            self.eos_ids = _eos_ids(model, self.tokenizer)
        log.info(
            "loaded in %.1fs: context %d, template %s, eos %s",
            time.perf_counter() - started,
            self.context_length,
            self.renderer.name if self.renderer else "-",
            sorted(self.eos_ids),
        )

    async def close(self) -> None:
        if self._thread is not None:
            self._pending.put(None)

    # -- prompts ----------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self.renderer is None:
            raise InvalidRequest("this model is an embedding model; it does not chat", param="model")
        try:
            return self.renderer.render(messages)
        except Exception as exc:  # template errors are the request's fault (e.g. role order)
            raise InvalidRequest(f"the chat template rejected these messages: {exc}", param="messages") from exc

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    @property
    def template_stop(self) -> list[str]:
        return self.renderer.stop if self.renderer else []

    # -- generation ---------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        seq = _Sequence(prompt_ids, params, asyncio.get_running_loop())
        self._waiting += 1
        self._pending.put(seq)
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # the thread drops it at its next step

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                seq = self._pending.get()
                if seq is None:
                    return
                self._waiting -= 1
                if seq.cancelled:
                    continue
                self._running += 1
                try:
                    self._run_sequence(seq)
                except Exception as exc:  # surfaced to the request as a typed error
                    log.exception("generation failed")
                    seq.push(exc)
                finally:
                    self._running -= 1

    def _run_sequence(self, seq: _Sequence) -> None:
        import torch

        params = seq.params
        limit = params.max_tokens or (self.context_length - len(seq.prompt_ids))
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        sampler = SequenceSampler(params, seq.prompt_ids, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)
        stops = StopStrings(params.stop)
        interval = max(1, self.cfg.stream_interval)

        input_ids = torch.tensor([seq.prompt_ids], device=self.device)
        started = time.perf_counter()
        out = self.model(input_ids=input_ids, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        pending_text, pending_tokens, generated = "", 0, 0
        finish: str | None = None
        while True:
            if seq.cancelled:
                return
            token = sampler.sample(logits)
            generated += 1
            pending_tokens += 1
            if token in stop_ids:
                finish = "stop"
            else:
                text, hit = stops.feed(detok.add(token))
                pending_text += text
                if hit:
                    finish = "stop"
                elif generated >= limit:
                    finish = "length"
            if finish is not None:
                if finish == "length" or token in stop_ids:
                    tail, hit = stops.feed(detok.flush())
                    pending_text += tail if hit else tail + stops.flush()
                seq.push(Chunk(pending_text, pending_tokens, finish))
                break
            if pending_tokens >= interval and pending_text:
                seq.push(Chunk(pending_text, pending_tokens))
                pending_text, pending_tokens = "", 0
            out = self.model(
                input_ids=torch.tensor([[token]], device=self.device), past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            logits = out.logits[0, -1]
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            rate = generated / elapsed
            self._speed = rate if self._speed == 0 else 0.8 * self._speed + 0.2 * rate

    def stats(self) -> EngineStats:
        return EngineStats(waiting=self._waiting, running=self._running, tokens_per_s=self._speed)

    # -- embeddings ----------------------------------------------------------------------------------------
    async def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        return await asyncio.to_thread(self._embed, texts, truncate)

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


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(x) for x in source)
    return ids


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" if k != "quantization_config" else "8-bit" for k, v in kwargs.items())
