"""Continuous batching and prefix caching on the real model: Gemma 3 270M mixes 15 sliding-window layers
(window 512) with 3 full-attention ones.  Greedy output in a batch equals greedy output alone, for
prompts longer than the window and than one prefill chunk; a prompt that shares a prefix with an earlier
one reuses it (and its output does not change); a hit is cut back where the sliding layers did not keep
what they would need.  The same holds with attention computed by two matmuls instead of SDPA (`kernels`),
and in bfloat16 the kernels the engine times at load still give the model's answers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmstack.common.wire import SamplingParams
from llmstack.services.engines.hf.batcher import PREFILL_TOKENS
from tests.support.engine_harness import Harness, harness
from tests.support.real_model import gemma_hf_dir

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
WINDOW = 512
# Varied text, so that a wrong window or position shows in the output (a repeated phrase would not).
LONG = " ".join(
    f"Note {i}: the {['red', 'green', 'blue', 'small', 'old'][i % 5]} {['box', 'river', 'song', 'door'][i % 4]} "
    f"was {['found', 'lost', 'sold', 'seen', 'kept', 'moved'][i % 6]} on day {i * 7 % 31}."
    for i in range(80)
)


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return gemma_hf_dir()


@pytest.fixture(scope="module")
def batched(gemma_dir: Path, caplog_module: Any) -> Iterator[Harness]:
    yield from harness(gemma_dir)


@pytest.fixture(scope="module")
def matmul(gemma_dir: Path) -> Iterator[Harness]:
    """Batched, attention as two matmuls (what `auto` picks in bfloat16 on CPUs without AMX), decode eager."""
    yield from harness(gemma_dir, attention_kernel="matmul", compile_decode="off")


@pytest.fixture(scope="module")
def caplog_module() -> Iterator[list[str]]:
    """The engine's log lines while the module's engines load."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, logger = Keep(), logging.getLogger("llmstack.engine.hf")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def solo(gemma_dir: Path) -> Iterator[Harness]:
    """The reference: one sequence at a time, no prefix cache, every step eager (`batched` compiles its
    decode steps: the default for a model this size)."""
    yield from harness(gemma_dir, max_batch_size=1, prefix_caching=False, compile_decode="off")


def _ids(h: Harness, text: str) -> list[int]:
    return h.engine.encode(text)


def test_gemma_batches_and_says_how(batched: Harness, caplog_module: list[str]) -> None:
    stats = batched.engine.stats()
    assert stats.batched and stats.max_batch_size == 32 and stats.prefix_caching
    loaded = [line for line in caplog_module if line.startswith("loaded in")]
    assert loaded and "3 full-attention and 15 sliding-window layers (window 512)" in loaded[-1]
    assert "prefix caching on" in loaded[-1]
    assert "attention decode sdpa, prefill sdpa" in loaded[-1]  # float32: SDPA, not timed
    assert loaded[-1].endswith("decode steps compiled")  # auto, for 100M parameters outside the embeddings
    assert any(line.startswith("decode steps run through a compiled graph (compiled in") for line in caplog_module)


@pytest.mark.parametrize("kernel", ["auto", "matmul"])
def test_bfloat16_attention_gives_the_models_answers(gemma_dir: Path, caplog_module: list[str], kernel: str) -> None:
    """auto: timed at load (on this machine's CPU, either kernel may win); matmul: asked for."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    compile_decode = "auto" if kernel == "auto" else "off"  # the default compiles its decode steps
    with contextlib.contextmanager(harness)(
        gemma_dir, dtype="bfloat16", attention_kernel=kernel, compile_decode=compile_decode
    ) as h:
        loaded = [line for line in caplog_module if line.startswith("loaded in")]
        said = "timed at load" if kernel == "auto" else "decode matmul, prefill matmul (--attention-kernel)"
        assert said in loaded[-1]
        kernels = h.engine._batchable.kernels  # type: ignore[union-attr]
        eiffel, counting = h.together(
            ("The Eiffel Tower is located in the city of", params, 0.0), ("One, two, three, four,", params, 0.0)
        )
        assert eiffel.text.startswith(" Paris"), (kernels, eiffel.text)
        assert counting.text.startswith(" five, six"), (kernels, counting.text)


def test_reference_outputs(batched: Harness) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eiffel, counting = batched.together(
        ("The Eiffel Tower is located in the city of", params, 0.0), ("One, two, three, four,", params, 0.0)
    )
    assert eiffel.text == " Paris, France. It is the tallest"
    assert counting.text == " five, six, seven, eight,"


@pytest.mark.parametrize("engine", ["batched", "matmul"])
def test_batched_equals_solo_past_the_window_and_the_chunk(
    engine: str, solo: Harness, request: pytest.FixtureRequest
) -> None:
    batched: Harness = request.getfixturevalue(engine)
    long_ids = _ids(batched, LONG)
    assert len(long_ids) > PREFILL_TOKENS + WINDOW  # chunked prefill, window layers past their window
    prompts: list[str | list[int]] = [
        long_ids,
        "The Eiffel Tower is located in the city of",
        long_ids[: WINDOW + 90] + _ids(batched, " Which day was the blue song found?")[1:],
        "One, two, three, four,",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [solo.alone(p, params) for p in prompts]
    # staggered: the short ones join while the long one is still being prefilled chunk by chunk
    got = batched.together(*((p, params, 0.05 * i) for i, p in enumerate(prompts)))
    assert batched.max_rows >= 2
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have.ids == want.ids, f"prompt {i}: batched {have.text!r} != solo {want.text!r}"
    assert batched.wait_idle()


def test_a_shared_prefix_longer_than_the_window_is_reused(batched: Harness, solo: Harness) -> None:
    system = _ids(batched, "Facts: " + LONG[: len(LONG) // 2])
    assert len(system) > WINDOW + 100
    first = system + _ids(batched, " Question: what was moved on day 3?")[1:]
    second = system + _ids(batched, " Question: which colour was the river on day 14, and why?")[1:]
    expected = solo.alone(second, GREEDY)
    batched.alone(first, GREEDY)
    before = batched.engine.stats()
    got = batched.alone(second, GREEDY)
    after = batched.engine.stats()
    reused = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
    assert reused >= len(system) - 1, f"reused {reused} of the {len(system)} shared tokens"
    assert after.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens == len(second)
    assert got.ids == expected.ids
    assert got.cached == reused and expected.cached == 0  # what the usage reports: the hit, or nothing
    assert 0 < after.prefix_cache_hit_rate < 1 and after.prefix_cache_positions > 0


def test_a_hit_is_cut_back_where_the_window_was_not_kept(batched: Harness, solo: Harness) -> None:
    """A long prompt is cached with only its newest window positions (about 2 windows); a prompt that
    leaves it early, before those, cannot reuse it (its sliding layers would need positions that were
    not kept).  Once that prompt has run, the cache holds its own window positions too, and a third
    prompt along the same path reuses it."""
    text = _ids(batched, "Story: " + LONG)
    assert len(text) > 2 * WINDOW + 50  # cached with window positions from about 50 on
    branch = text[: WINDOW // 2] + _ids(batched, " The end. Now count: one, two, three,")[1:]
    twin = text[: WINDOW // 2] + _ids(batched, " The end. Now count: one, two, three, four,")[1:]
    expected = [solo.alone(p, GREEDY) for p in (branch, twin)]
    batched.alone(text, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    hits = []
    for prompt, want in zip((branch, twin), expected, strict=True):
        before = batched.engine.stats().prefix_cache_hit_tokens
        got = batched.alone(prompt, GREEDY)
        assert got.ids == want.ids
        hits.append(batched.engine.stats().prefix_cache_hit_tokens - before)
        assert got.cached == hits[-1]  # the usage counts only what was reused
    assert hits[0] <= 1, "a hit beyond what the sliding layers kept was used"  # 1: <bos>, which all prompts share
    assert hits[1] >= len(branch) - 2  # the twin shares all of `branch` but its last tokens


def test_solo_engine_has_prefix_caching_off(solo: Harness) -> None:
    stats = solo.engine.stats()
    assert not stats.prefix_caching and stats.prefix_cache_hit_rate is None and stats.prefix_cache_hit_tokens is None
