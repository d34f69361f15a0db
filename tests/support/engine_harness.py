"""An HF engine driven directly on its own event loop, for batching tests: it records each sequence's
token ids (chunks carry only text) and the largest running batch it saw."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstack.common.wire import SamplingParams
from llmstack.services.engines.hf.engine import HFEngine
from llmstack.services.engines.hf.loading import HFEngineConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@dataclass
class Result:
    ids: list[int]
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    cached: int | None = None  # prompt tokens the prefix cache supplied (the first chunk says)


@dataclass
class Harness:
    """An engine on its own event loop, recording each sequence's token ids (chunks carry only text)."""

    engine: HFEngine
    loop: asyncio.AbstractEventLoop
    ids: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    max_rows: int = 0

    def __post_init__(self) -> None:
        accept = self.engine._accept

        def recording_accept(seq: Any, token: int) -> bool:
            self.ids[tuple(seq.prompt_ids)] = seq.generated  # the sequence's own list, as it grows
            self.max_rows = max(self.max_rows, self.engine.stats().batch_size)
            return accept(seq, token)

        self.engine._accept = recording_accept  # type: ignore[method-assign]
        self.run(self.engine.start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout=300))

    async def generate(self, prompt: str | list[int], params: SamplingParams = GREEDY, delay: float = 0.0) -> Result:
        await asyncio.sleep(delay)
        prompt_ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        result = Result(ids=[])
        async for chunk in self.engine.generate(prompt_ids, params):
            result.text += chunk.text
            result.tokens += chunk.tokens
            result.finish = chunk.finish_reason or result.finish
            if result.cached is None:
                result.cached = chunk.cached_tokens
        result.ids = list(self.ids[tuple(prompt_ids)])
        return result

    def together(self, *jobs: tuple[str | list[int], SamplingParams, float]) -> list[Result]:
        async def all_of() -> list[Result]:
            return await asyncio.gather(*(self.generate(p, sp, d) for p, sp, d in jobs))

        return self.run(all_of())

    def alone(self, prompt: str | list[int], params: SamplingParams = GREEDY) -> Result:
        return self.run(self.generate(prompt, params))

    def wait_idle(self) -> bool:
        """The engine thread drops finished or aborted rows right after their last chunk: wait for it."""

        async def idle() -> bool:
            for _ in range(200):
                stats = self.engine.stats()
                if stats.batch_size == 0 and stats.waiting == 0:
                    return True
                await asyncio.sleep(0.01)
            return False

        return self.run(idle())


def harness(model_dir: Path, **cfg: Any) -> Iterator[Harness]:
    """A started engine for `model_dir` (on the CPU, with these HFEngineConfig settings); closed after.

    float32 unless `dtype` says otherwise: greedy output is compared token for token between a batch
    and a sequence alone, and in bfloat16 the rounding of a matmul depends on its shape, enough to tip a
    near-tie between two tokens."""
    loop = asyncio.new_event_loop()
    cfg = {"dtype": "float32", **cfg}
    h = Harness(HFEngine(HFEngineConfig(model_path=str(model_dir), device="cpu", **cfg)), loop)
    try:
        yield h
    finally:
        h.run(h.engine.close())
        loop.close()
