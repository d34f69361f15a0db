"""Continuous batching in the transformers engine: greedy output in a batch equals output alone, rows
join and leave between decode steps, limits and per-request settings hold, aborts free their rows."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmstack.common.wire import SamplingParams
from llmstack.services.engines.hf.engine import HFEngine
from tests.support.engine_harness import GREEDY, Harness, Result, harness
from tests.support.tiny_model import build_tiny_llama

PROMPTS = [
    "Hello",
    "The scheduler streams many tokens before noon.",
    "我很想去北京旅行，我应该在哪里做什么？",
    "def main() -> None:\n    print('hi')\n" * 3,
    "1 2 3 4 5 6 7 8 9 10 100 1000 and then some more words to make it long enough " * 4,
    "Say this is a test.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 layers and 4 heads: enough structure that a wrong mask or position id changes the output
    return build_tiny_llama(tmp_path_factory.mktemp("batch-llama"), hidden=256, layers=4, heads=4, seed=3)


@pytest.fixture(scope="module")
def batched(model_dir: Path) -> Iterator[Harness]:
    yield from harness(model_dir)


@pytest.fixture(scope="module")
def solo(model_dir: Path) -> Iterator[Harness]:
    """The reference: the same engine code, one sequence at a time."""
    yield from harness(model_dir, max_batch_size=1)


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
    for h in harness(model_dir, max_batch_size=2):
        got = h.together(*((p, GREEDY, 0.0) for p in PROMPTS))
        assert h.max_rows == 2
        assert [r.ids for r in got] == [e.ids for e in expected]


def test_token_budget_preempts_and_resumes_exactly(model_dir: Path, solo: Harness) -> None:
    """A budget too small for everyone: rows are preempted as they grow and later re-prefilled with
    their output so far; every request still gets exactly its solo output."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [solo.alone(p, params) for p in PROMPTS[:4]]
    for h in harness(model_dir, max_batch_tokens=100):
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
            for h in harness(model_dir):
                assert not h.engine.stats().batched and h.engine.stats().max_batch_size == 1
                got = h.together(*((p, GREEDY, 0.0) for p in PROMPTS[:3]))
                assert [r.ids for r in got] == [e.ids for e in expected]
                assert h.max_rows == 1
    finally:
        HFEngine._batching_unsupported = original  # type: ignore[method-assign]
    assert "continuous batching is off" in caplog.text


def test_stream_interval_sends_the_first_token_at_once(model_dir: Path, solo: Harness) -> None:
    """`--stream-interval 4`: chunks of 4 tokens, but the first token leaves alone (time to first token)."""
    want = solo.alone(PROMPTS[1])

    async def chunks(engine: HFEngine) -> list[tuple[int, str]]:
        return [(c.tokens, c.text) async for c in engine.generate(engine.encode(PROMPTS[1]), GREEDY)]

    with contextlib.contextmanager(harness)(model_dir, stream_interval=4) as h:
        got = h.run(chunks(h.engine))
    assert [n for n, _ in got] == [1, 4, 4, 4, 4, 4, 3]
    assert "".join(text for _, text in got) == want.text


def test_compiled_decode_steps_equal_eager_ones(model_dir: Path, solo: Harness, caplog: Any) -> None:
    """`--compile-decode on` (auto leaves a model this small eager): the decode steps run through a graph
    compiled at load, with rows joining and leaving between steps, and every token equals the eager
    engine's alone."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (24, 5, 17, 9, 30, 3)]
    expected = [solo.alone(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    with caplog.at_level("INFO", logger="llmstack.engine.hf"):
        with contextlib.contextmanager(harness)(model_dir, compile_decode="on") as h:
            assert h.engine._batcher is not None and h.engine._batcher.compiled is not None
            got = h.together(*((p, sp, 0.02 * i) for i, (p, sp) in enumerate(zip(PROMPTS, params, strict=True))))
            assert h.max_rows >= 3
    assert [r.ids for r in got] == [r.ids for r in expected]
    assert any(r.message.startswith("decode steps run through a compiled graph") for r in caplog.records)
    assert any(r.message.endswith("decode steps compiled") for r in caplog.records if "loaded in" in r.message)
