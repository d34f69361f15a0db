"""The worker's state and work: its engine, admission, the text thread, prompts and the generation stream.
Lives on `app.state.worker`; `app.py` routes to it, `link.py` keeps it registered with the controller."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmstack.common.errors import ContextLengthExceeded, InvalidRequest, LLMStackError
from llmstack.common.metrics import RequestTracker, ServingMetrics
from llmstack.common.wire import (
    CountTokensRequest,
    GenerateRequest,
    SamplingParams,
    ToolSpec,
    UsageEvent,
    WorkerRegistration,
    WorkerStatus,
)
from llmstack.services.engines.base import Engine
from llmstack.services.worker.admission import Admission
from llmstack.services.worker.events import echo_event, error_event, line, text_event
from llmstack.services.worker.link import ControllerLink
from llmstack.services.worker.reasoning import ThinkReader
from llmstack.services.worker.reasoning import reader_for as thinker_for
from llmstack.services.worker.toolcalls import ToolCallReader, forced_structure, reader_for

log = logging.getLogger("llmstack.worker")
T = TypeVar("T")


@dataclass
class WorkerSettings:
    worker_address: str
    model_names: list[str]
    controller_address: str | None = "http://127.0.0.1:21001"
    register: bool = True
    limit_worker_concurrency: int = 5
    max_queue: int = 256
    heartbeat_interval: float = 3.0
    cluster_token: str | None = None
    embed_in_truncate: bool = False
    tool_parser: str = "hermes"  # how tool calls are read from the model's text (toolcalls.PARSERS)
    reasoning_parser: str | None = None  # how reasoning is read from it (reasoning.PARSERS); None: not at all
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class WorkerService:
    """The worker's state: engine, admission, text thread, controller link."""

    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = ServingMetrics("worker")
        self.admission = Admission(settings.limit_worker_concurrency, settings.max_queue)
        self.ready = False
        self.draining = False
        self.link: ControllerLink | None = None
        self.served = 0  # requests answered, and tokens generated: cheap counters for /health
        self.generated_tokens = 0
        # Rendering a chat, tokenising it and compiling its grammar take milliseconds per thousand tokens:
        # on the event loop they would hold back every other stream's tokens.  They run on one thread of
        # their own (as vLLM's tokenizer executor), shared with the engine (`Engine.text_executor`); the
        # tokenizers release the GIL while they work.  No torch compute runs there, so it starts no
        # OpenMP pool beside the engine's (see `engines/hf/engine.py`).
        self.text_thread = ThreadPoolExecutor(1, thread_name_prefix="worker-text")
        engine.text_executor = self.text_thread

    def status(self) -> WorkerStatus:
        stats = self.engine.stats()
        return WorkerStatus(
            queue_length=self.admission.waiting + self.admission.running,
            running=self.admission.running,
            speed=max(stats.tokens_per_s, 1.0) if stats.tokens_per_s else 1.0,
        )

    def registration(self) -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=self.settings.worker_id,
            worker_address=self.settings.worker_address,
            model_names=self.settings.model_names,
            kind=self.engine.kind,
            engine=self.engine.name,
            context_length=self.engine.context_length,
            capacity=self.settings.limit_worker_concurrency,
            status=self.status(),
        )

    async def on_text_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.text_thread, fn, *args)

    def prompt_ids(self, req: GenerateRequest | CountTokensRequest) -> list[int]:
        if req.messages is not None:
            spec = getattr(req, "tools", None)
            tools = spec.tools if spec is not None and spec.choice != "none" else None
            prompt = self.engine.render_chat(req.messages, tools, req.chat_template_kwargs)
            return self.engine.encode(prompt, add_special_tokens=False)
        if req.prompt is not None:
            special = getattr(req, "add_special_tokens", None)
            return self.engine.encode(req.prompt, True if special is None else special)
        raise InvalidRequest("either 'prompt' or 'messages' is required", param="prompt")

    def check_budget(self, prompt_len: int, params: SamplingParams) -> SamplingParams:
        ctx = self.engine.context_length
        if prompt_len == 0:  # nothing to condition on: engines cannot start a sequence from no tokens
            raise InvalidRequest("The prompt is empty; send at least some text.", param="prompt")
        if prompt_len >= ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens. However, your messages resulted in "
                f"{prompt_len} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        room = ctx - prompt_len
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the messages, {params.max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        stop = list(dict.fromkeys([*params.stop, *getattr(self.engine, "template_stop", [])]))
        update: dict[str, Any] = {"max_tokens": params.max_tokens or room, "stop": stop}
        if not params.ignore_eos:  # the template's end-of-turn tokens end a sequence as its eos does
            turn_ends = getattr(self.engine, "template_stop_ids", [])
            update["stop_token_ids"] = list(dict.fromkeys([*params.stop_token_ids, *turn_ends]))
        return params.model_copy(update=update)

    def admit_prompt(self, req: GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The request's prompt as token ids and its checked sampling settings (text thread)."""
        prompt_ids = self.prompt_ids(req)
        return prompt_ids, self.prepare(req, len(prompt_ids))

    def prepare(self, req: GenerateRequest, prompt_len: int) -> SamplingParams:
        """The request's sampling settings, checked against the context and the engine, with the
        grammar that forces a tool call when the request asks for one."""
        params = self.check_budget(prompt_len, req.params)
        if req.tools is not None:
            structure = forced_structure(req.tools)
            if structure is not None:
                params = params.model_copy(update={"structure": structure})
        try:
            self.engine.check(params)
        except InvalidRequest as exc:
            if req.tools is not None and req.tools.choice in ("function", "required"):
                exc.param = "tools"
            raise
        return params

    def readers(self, spec: ToolSpec | None, n: int) -> list[ToolCallReader | None]:
        return [reader_for(spec, self.settings.tool_parser) if spec is not None else None for _ in range(n)]

    def thinkers(self, prompt_ids: list[int], params: SamplingParams, chat: bool) -> list[ThinkReader | None]:
        """Reasoning readers for a chat's choices (none for plain prompts, and none when a grammar
        decides the whole output: it leaves no room to think)."""
        parser = self.settings.reasoning_parser
        if not parser or not chat or params.structure is not None:
            return [None] * params.n
        tail = self.engine.decode(prompt_ids[-8:]) if parser == "qwen3" else ""
        return [thinker_for(parser, tail) for _ in range(params.n)]

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        echo_text: str | None,
        tracker: RequestTracker,
        tools: ToolSpec | None = None,
        chat: bool = False,
        *,
        priority: int = 0,
        report_prompt: bool = False,
    ) -> AsyncIterator[bytes]:
        """NDJSON events for all `n` choices, then the usage line; errors become an error line.  With
        `report_prompt`, the prompt's token count goes first, before the request waits for a slot."""
        if report_prompt:
            yield line({"prompt_tokens": len(prompt_ids)})
        completion_tokens = reasoning_tokens = 0
        cached_tokens: int | None = None  # prompt tokens from the prefix cache (the prompt counts once: first report)
        self.served += 1
        readers = self.readers(tools, params.n)
        thinkers = self.thinkers(prompt_ids, params, chat)
        # echo text goes first; with prompt logprobs it waits for them (they come with the first chunk)
        echo_waiting = set(range(params.n)) if echo_text is not None and params.prompt_logprobs is not None else set()
        try:
            async with self.admission.slot(priority):
                if echo_text is not None and not echo_waiting:
                    for i in range(params.n):
                        yield line({"index": i, "text": echo_text, "tokens": 0})
                source = self._single(prompt_ids, params) if params.n == 1 else self._fan_out(prompt_ids, params)
                async with aclosing(source) as chunks:  # closed at once when the client leaves: aborts
                    async for index, chunk in chunks:
                        if index in echo_waiting:
                            echo_waiting.discard(index)
                            yield line(echo_event(index, echo_text or "", chunk))
                        tracker.first_token()
                        if cached_tokens is None and chunk.cached_tokens is not None:
                            cached_tokens = chunk.cached_tokens
                        completion_tokens += chunk.tokens
                        self.generated_tokens += chunk.tokens
                        thinker = thinkers[index]
                        event = text_event(index, chunk, readers[index], thinker)
                        if thinker is not None and (thinker.thinking or ("reasoning" in event and not event["text"])):
                            reasoning_tokens += chunk.tokens  # still thinking, or the chunk that ended it
                        yield line(event)
            tracker.usage(len(prompt_ids), completion_tokens)
            usage: UsageEvent = {"usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens}}
            if any(thinkers):
                usage["usage"]["reasoning_tokens"] = reasoning_tokens
            if cached_tokens is not None:
                usage["usage"]["cached_tokens"] = cached_tokens
            yield line(usage)
        except LLMStackError as exc:
            tracker.failed(exc.status_code)
            yield line(error_event(exc))
        except Exception as exc:
            log.exception("generation failed")
            tracker.failed(500)
            yield line(error_event(LLMStackError(f"generation failed: {type(exc).__name__}: {exc}")))

    async def _single(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[tuple[int, Any]]:
        async with aclosing(self.engine.generate(prompt_ids, params)) as chunks:
            async for chunk in chunks:
                yield 0, chunk

    async def _fan_out(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[tuple[int, Any]]:
        """`n` choices as independent sequences (seed + i keeps them distinct yet reproducible)."""
        merged: asyncio.Queue[tuple[int, Any] | BaseException | None] = asyncio.Queue()

        async def pump(i: int) -> None:
            seed = None if params.seed is None else params.seed + i
            try:
                async for chunk in self.engine.generate(prompt_ids, params.model_copy(update={"seed": seed, "n": 1})):
                    await merged.put((i, chunk))
            except BaseException as exc:  # re-raised by the consumer
                await merged.put(exc)
            finally:
                await merged.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(params.n)]
        try:
            done = 0
            while done < params.n:
                item = await merged.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def begin_drain(self) -> None:
        """On SIGTERM, before the server drains: refuse new work and leave the controller's table, so
        routing moves away while the requests under way finish."""
        if self.draining:
            return
        self.draining = True
        log.info("stopping: unregistering, then finishing %d request(s) under way", self.admission.running)
        if self.link is not None:
            await self.link.stop()
