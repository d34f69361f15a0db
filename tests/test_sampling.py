"""Next-token selection: each control does what it says, on real logits rows."""

from __future__ import annotations

import torch

from llmstack.common.wire import SamplingParams
from llmstack.services.engines.hf.sampling import SequenceSampler

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


def test_draws_follow_the_distribution_and_never_pick_impossible_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    s = sampler(temperature=1.0, seed=0)
    counts = [0, 0, 0, 0]
    for _ in range(4000):
        counts[s.sample(torch.log(probs))] += 1
    assert counts[3] == 0
    for got, want in zip(counts[:3], [0.5, 0.3, 0.2], strict=True):
        assert abs(got / 4000 - want) < 0.03, counts


def test_a_seeded_row_does_not_depend_on_its_neighbours() -> None:
    from llmstack.services.engines.hf.sampling import sample_rows

    row = torch.randn(50, generator=torch.Generator().manual_seed(1))

    def run(batch: int, position: int) -> list[int]:
        mine = sampler(temperature=1.0, seed=9)
        others = [sampler(temperature=0.5 + i, seed=100 + i) for i in range(batch - 1)]
        tokens = []
        for _ in range(20):
            logits = torch.randn(batch, 50)
            logits[position] = row
            samplers = others[:position] + [mine] + others[position:]
            tokens.append(sample_rows(samplers, logits)[position].token)
        return tokens

    alone = run(1, 0)
    assert run(4, 0) == alone and run(4, 2) == alone
    assert len(set(alone)) > 3  # it really samples


def test_a_large_vocabulary_draws_by_blocks_as_its_softmax_says() -> None:
    """Vocabularies above a few thousand entries go through the two-level draw (block sums, then one block):
    frequencies follow the softmax across blocks and within one, the padding of the last block and tokens of
    weight 0 (cut by top-k/p or a grammar) are never drawn."""
    from llmstack.services.engines.hf.sampling import sample_rows

    vocab = 5000  # five blocks of 1,024, the last one padded
    row = torch.full((vocab,), float("-inf"))
    chosen = {7: 0.4, 1023: 0.1, 1024: 0.2, 4999: 0.3}  # block edges and the last real token
    for token, p in chosen.items():
        row[token] = torch.log(torch.tensor(p))
    samplers = [sampler(temperature=1.0, seed=3), sampler(temperature=1.0, seed=4)]
    counts = dict.fromkeys(chosen, 0)
    draws = 1500
    for _ in range(draws):
        for picked in sample_rows(samplers, torch.stack([row, row])):
            assert picked.token in chosen, picked.token
            counts[picked.token] += 1
    for token, p in chosen.items():
        assert abs(counts[token] / (2 * draws) - p) < 0.03, counts


def test_greedy_over_a_large_vocabulary_takes_the_first_maximum() -> None:
    from llmstack.services.engines.hf.sampling import argmax_rows

    x = torch.randn(3, 262_144, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    x[1, 5000] = x[1, 200_000] = 100.0  # a tie: the first one wins, as torch.argmax says
    x[2, -1] = 100.0
    assert argmax_rows(x) == x.argmax(dim=-1).tolist() == [argmax_rows(x[:1])[0], 5000, 262_143]
    odd = torch.randn(2, 5001)  # a vocabulary that is no multiple of the block
    assert argmax_rows(odd) == odd.argmax(dim=-1).tolist()
