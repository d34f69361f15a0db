"""The engine interface the worker's HTTP layer talks to; it never knows which backend runs."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from llmstack.common.errors import InvalidRequest
from llmstack.common.wire import SamplingParams, Structure, WorkerKind

T = TypeVar("T")


@dataclass(slots=True)
class Chunk:
    """Text produced since the previous chunk of one sequence; `finish_reason` ends the sequence.

    `logprobs` has one OpenAI-shaped entry per token of the chunk when the request asked for them;
    `prompt_logprobs` (first chunk only) the prompt's, when asked for.  `stop_sequence` (last chunk
    only) is the stop string that ended the sequence, when one did.  `cached_tokens` (first chunk only,
    when the engine knows it) is how many prompt tokens came from the prefix cache instead of a forward."""

    text: str
    tokens: int
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any]] | None = None
    stop_sequence: str | None = None
    cached_tokens: int | None = None

    def then(self, later: Chunk) -> Chunk:
        """This chunk and the next one of the same sequence as one."""
        logprobs = self.logprobs if later.logprobs is None else (self.logprobs or []) + later.logprobs
        return Chunk(
            self.text + later.text,
            self.tokens + later.tokens,
            later.finish_reason,
            logprobs,
            self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
            later.stop_sequence,
            self.cached_tokens if self.cached_tokens is not None else later.cached_tokens,
        )


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    batch_size: int | None = None  # sequences in the current forward pass (batching engines)
    kv_cache_usage: float | None = None  # fraction of the KV cache in use (engines that manage one)
    # prefix caching, since start (None: the engine has none, or it is off)
    prefix_cache_queried_tokens: int | None = None  # prompt tokens looked up
    prefix_cache_hit_tokens: int | None = None  # of those, served from the cache

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        queried, hits = self.prefix_cache_queried_tokens, self.prefix_cache_hit_tokens
        if queried is None or hits is None:
            return None
        return hits / queried if queried else 0.0


class Engine(abc.ABC):
    kind: WorkerKind
    name: str  # e.g. "transformers", "vllm"
    context_length: int
    #: The worker's one thread for prompt work (rendering, tokenising, grammar compilation), set by the worker
    #: before `start`: such work never runs on the event loop, where it would stall every stream.
    text_executor: Executor | None = None

    async def on_text_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the text thread (asyncio's default executor when no worker set one)."""
        return await asyncio.get_running_loop().run_in_executor(self.text_executor, fn, *args)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights and warm up; called once before serving."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    @abc.abstractmethod
    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt for a chat, through the model's chat template (or a named fallback), with the
        tool definitions when given; `template_kwargs` are further variables for the template (e.g.
        `enable_thinking`, `reasoning_effort`)."""

    def check(self, params: SamplingParams) -> None:  # noqa: B027 - optional hook
        """Raise `InvalidRequest` for settings this engine cannot honour, before streaming starts (on the
        text thread: it may compile a grammar)."""

    def prepare_structured_outputs(self) -> None:  # noqa: B027 - optional hook
        """Build what constrained decoding needs once, at load (on the text thread), not on the first
        structured request: xgrammar's view of the vocabulary walks every token."""

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text (special tokens left out)."""
        raise InvalidRequest("this engine cannot turn token ids back into text", param="tokens")

    def token_strs(self, ids: list[int]) -> list[str]:
        """The vocabulary entry of each token id."""
        raise InvalidRequest("this engine cannot list token strings", param="return_token_strs")

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Stream one sequence.  Closing the iterator early aborts the generation."""

    @abc.abstractmethod
    async def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        """L2-normalised embeddings and the number of tokens consumed."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...


class TemplatedEngine(Engine):
    """Prompts through a Hugging Face tokenizer and a `templates.ChatRenderer` (None for embedding
    models): what every engine built on transformers' tokenizers shares."""

    tokenizer: Any = None
    renderer: Any = None

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if self.renderer is None:
            raise InvalidRequest("this model is an embedding model; it does not chat", param="model")
        try:
            return self.renderer.render(messages, tools, template_kwargs)
        except Exception as exc:  # template errors are the request's fault (e.g. role order)
            raise InvalidRequest(f"the chat template rejected these messages: {exc}", param="messages") from exc

    def check_logit_bias(self, params: SamplingParams, vocab_size: int) -> None:
        bad = [t for t in params.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(
                f"logit_bias has token ids outside this model's vocabulary (0..{vocab_size - 1}): {bad[:5]}",
                param="logit_bias",
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def prepare_structured_outputs(self) -> None:
        """Through the engine's own check: compiling the smallest grammar builds the tokenizer's info."""
        if self.renderer is not None:
            self.check(SamplingParams(structure=Structure(kind="json_object")))

    def _check_ids(self, ids: list[int]) -> None:
        size = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < size]
        if bad:
            raise InvalidRequest(
                f"token ids outside this model's vocabulary (0..{size - 1}): {bad[:5]}", param="tokens"
            )

    def decode(self, ids: list[int]) -> str:
        self._check_ids(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_strs(self, ids: list[int]) -> list[str]:
        self._check_ids(ids)
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]

    @property
    def template_stop(self) -> list[str]:
        """The template's stop strings that are text.  Those that are special tokens stop by id
        (`template_stop_ids`): decoded text skips special tokens, so such a string never matches, and vLLM
        holds back the longest stop string's length of every stream to look for it (Gemma's `<start_of_turn>`:
        13 characters, about 3 tokens more time to the first one)."""
        if not self.renderer:
            return []
        return [s for s in self.renderer.stop if s not in self.renderer.end_of_turn]

    @property
    def template_stop_ids(self) -> list[int]:
        """Special tokens that end a turn of the chat template in use (`<end_of_turn>`, `<|im_end|>`...)."""
        return self.renderer.stop_token_ids if self.renderer else []
