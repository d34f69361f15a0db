"""Continuous batching in the transformers engine: greedy output in a batch equals output alone, rows
join and leave between decode steps, limits and per-request settings hold, aborts free their rows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llmstack.common.wire import SamplingParams
from llmstack.services.engines.hf.engine import HFEngine
from llmstack.services.engines.hf.loading import HFEngineConfig
from tests.support.tiny_model import build_tiny_llama

PROMPTS = [
    "Hello",
    "The scheduler streams many tokens before noon.",
    "我很想去北京旅行，我应该在哪里做什么？",
    "def main() -> None:\n    print('hi')\n" * 3,
    "1 2 3 4 5 6 7 8 9 10 100 1000 and then some more words to make it long enough " * 4,
    "Say this is a test.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 layers and 4 heads: enough structure that a wrong mask or position id changes the output
    return build_tiny_llama(tmp_path_factory.mktemp("batch-llama"), hidden=256, layers=4, heads=4, seed=3)


@dataclass
class Result:
    ids: list[int]
    text: str = ""
    tokens: int = 0
    finish: str | None = None


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

    async def generate(self, prompt: str, params: SamplingParams = GREEDY, delay: float = 0.0) -> Result:
        await asyncio.sleep(delay)
        prompt_ids = self.engine.encode(prompt)
        result = Result(ids=[])
        async for chunk in self.engine.generate(prompt_ids, params):
            result.text += chunk.text
            result.tokens += chunk.tokens
            result.finish = chunk.finish_reason or result.finish
        result.ids = list(self.ids[tuple(prompt_ids)])
        return result

    def together(self, *jobs: tuple[str, SamplingParams, float]) -> list[Result]:
        async def all_of() -> list[Result]:
            return await asyncio.gather(*(self.generate(p, sp, d) for p, sp, d in jobs))

        return self.run(all_of())

    def alone(self, prompt: str, params: SamplingParams = GREEDY) -> Result:
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


def _harness(model_dir: Path, **cfg: Any) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    h = Harness(HFEngine(HFEngineConfig(model_path=str(model_dir), device="cpu", **cfg)), loop)
    try:
        yield h
    finally:
        h.run(h.engine.close())
        loop.close()


@pytest.fixture(scope="module")
def batched(model_dir: Path) -> Iterator[Harness]:
    yield from _harness(model_dir)


@pytest.fixture(scope="module")
def solo(model_dir: Path) -> Iterator[Harness]:
    """The reference: the same engine code, one sequence at a time."""
    yield from _harness(model_dir, max_batch_size=1)


def test_batching_is_on_for_llama(batched: Harness) -> None:
    stats = batched.engine.stats()
    assert stats.batched and stats.max_batch_size == 32 and stats.batch_size == 0


def test_greedy_in_a_batch_equals_greedy_alone(batched: Harness, solo: Harness) -> None:
    expected = [solo.alone(p) for p in PROMPTS]
    assert solo.max_rows == 1
    # staggered arrivals: rows join a batch that is already decoding, of different prompt lengths
    got = batched.together(*((p, GREEDY, 0.02 * i) for i, p in enumerate(PROMPTS)))
    assert batched.max_rows >= 3, "requests never shared a forward pass"
    for prompt, want, have in zip(PROMPTS, expected, got, strict=True):
        assert have.ids == want.ids, f"batched output differs for {prompt[:30]!r}"
        assert have.text == want.text
        assert have.tokens == 24 and have.finish == "length"
    assert batched.wait_idle()


def test_each_request_keeps_its_own_settings(batched: Harness, solo: Harness) -> None:
    jobs = [
        (PROMPTS[0], SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=20, ignore_eos=True)),
        (PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)),
        (PROMPTS[2], SamplingParams(temperature=0.7, top_k=5, seed=11, max_tokens=30, ignore_eos=True)),
        (PROMPTS[3], SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=16, ignore_eos=True)),
        (PROMPTS[4], SamplingParams(temperature=0.0, frequency_penalty=1.0, max_tokens=12, ignore_eos=True)),
    ]
    expected = [solo.alone(p, sp) for p, sp in jobs]
    got = batched.together(*((p, sp, 0.0) for p, sp in jobs))
    for (_, params), want, have in zip(jobs, expected, got, strict=True):
        assert have.ids == want.ids
        assert have.tokens == params.max_tokens and len(have.ids) == params.max_tokens


def test_stop_strings_and_stop_tokens_end_only_their_row(batched: Harness) -> None:
    base = batched.alone(PROMPTS[5], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    stop_token = base.ids[3]
    stop_text = base.text[len(base.text) // 2 : len(base.text) // 2 + 2]
    by_token, by_text, full = batched.together(
        (PROMPTS[5], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_token]), 0.0),
        (PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=20, stop=[stop_text], ignore_eos=True), 0.0),
        (PROMPTS[2], GREEDY, 0.0),
    )
    assert by_token.finish == "stop" and by_token.ids == base.ids[: base.ids.index(stop_token) + 1]
    if stop_text.strip():
        assert stop_text not in by_text.text
    assert full.finish == "length" and full.tokens == 24


def test_rows_beyond_max_batch_size_wait_their_turn(model_dir: Path, solo: Harness) -> None:
    expected = [solo.alone(p) for p in PROMPTS]
    for h in _harness(model_dir, max_batch_size=2):
        got = h.together(*((p, GREEDY, 0.0) for p in PROMPTS))
        assert h.max_rows == 2
        assert [r.ids for r in got] == [e.ids for e in expected]


def test_token_budget_preempts_and_resumes_exactly(model_dir: Path, solo: Harness) -> None:
    """A budget too small for everyone: rows are preempted as they grow and later re-prefilled with
    their output so far; every request still gets exactly its solo output."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [solo.alone(p, params) for p in PROMPTS[:4]]
    for h in _harness(model_dir, max_batch_tokens=100):
        got = h.together(*((p, params, 0.0) for p in PROMPTS[:4]))
        assert [r.ids for r in got] == [e.ids for e in expected]
        assert [r.text for r in got] == [e.text for e in expected]
        assert h.engine.stats().preemptions > 0, "the budget never forced a preemption"
        assert h.wait_idle()


def test_abort_frees_the_row_and_the_batch_goes_on(batched: Harness) -> None:
    async def abort_early() -> int:
        gen = batched.engine.generate(batched.engine.encode(PROMPTS[4]), SamplingParams(max_tokens=500))
        got = 0
        async for chunk in gen:
            got += chunk.tokens
            if got >= 3:
                break
        await gen.aclose()
        return got

    async def scenario() -> tuple[int, Result]:
        return await asyncio.gather(abort_early(), batched.generate(PROMPTS[0], GREEDY))

    aborted, other = batched.run(scenario())
    assert aborted >= 3 and other.tokens == 24
    assert batched.wait_idle()


def test_sequential_fallback_gives_the_same_output(model_dir: Path, solo: Harness, caplog: Any) -> None:
    expected = [solo.alone(p) for p in PROMPTS[:3]]
    original = HFEngine._batching_unsupported
    HFEngine._batching_unsupported = lambda self: "forced for this test"  # type: ignore[method-assign]
    try:
        with caplog.at_level("WARNING", logger="llmstack.engine.hf"):
            for h in _harness(model_dir):
                assert not h.engine.stats().batched and h.engine.stats().max_batch_size == 1
                got = h.together(*((p, GREEDY, 0.0) for p in PROMPTS[:3]))
                assert [r.ids for r in got] == [e.ids for e in expected]
                assert h.max_rows == 1
    finally:
        HFEngine._batching_unsupported = original  # type: ignore[method-assign]
    assert "continuous batching is off" in caplog.text
