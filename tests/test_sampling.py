"""Next-token selection: each control does what it says, on real logits rows."""

from __future__ import annotations

import torch

from llmstack.engines.sampling import SequenceSampler
from llmstack.wire import SamplingParams

CPU = torch.device("cpu")


def sampler(prompt: list[int] | None = None, **params: object) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**params), prompt or [], CPU)  # type: ignore[arg-type]


def logits() -> torch.Tensor:
    return torch.tensor([1.0, 3.0, 2.9, -1.0, 0.5])


def test_temperature_zero_is_greedy() -> None:
    assert sampler(temperature=0).sample(logits()) == 1


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    assert {sampler(temperature=1.5, top_k=1, seed=s).sample(logits()) for s in range(20)} == {1}
    assert {sampler(temperature=1.5, top_p=0.01, seed=s).sample(logits()) for s in range(20)} == {1}


def test_top_k_limits_the_candidates() -> None:
    seen = {sampler(temperature=5, top_k=2, seed=s).sample(logits()) for s in range(200)}
    assert seen == {1, 2}


def test_seed_reproducible() -> None:
    def run(seed: int) -> list[int]:
        s = sampler(temperature=2, seed=seed)
        return [s.sample(logits()) for _ in range(12)]

    assert run(42) == run(42)
    assert len({tuple(run(seed)) for seed in range(6)}) > 1


def test_presence_and_frequency_penalties_push_repeats_down() -> None:
    s = sampler(temperature=0, presence_penalty=2.0)
    assert s.sample(logits()) == 1
    assert s.sample(logits()) == 2  # token 1 was generated: 3.0 - 2.0 < 2.9
    f = sampler(temperature=0, frequency_penalty=0.06)
    picks = [f.sample(logits()) for _ in range(4)]
    assert picks[:2] == [1, 1] and 2 in picks  # penalty grows with each repeat: 3.0 - 0.06*2 < 2.9


def test_repetition_penalty_covers_the_prompt() -> None:
    assert sampler([1], temperature=0, repetition_penalty=1.2).sample(logits()) == 2  # 3.0/1.2 < 2.9
    negative = torch.tensor([-1.0, -1.1])
    assert sampler([0], temperature=0, repetition_penalty=2.0).sample(negative) == 1  # -1*2 < -1.1
