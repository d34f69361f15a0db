"""Next-token selection from logits with OpenAI- and HF-style controls, one sequence or a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..wire import SamplingParams

GREEDY_BELOW = 1e-5


@dataclass
class SequenceSampler:
    """Per-sequence sampling state: the generator (for `seed`) and generated-token counts (penalties)."""

    params: SamplingParams
    prompt_ids: list[int]
    device: torch.device
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.params.temperature >= GREEDY_BELOW:
            self.generator = torch.Generator(device=self.device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties on a 1-D float32 logits row (modified in place)."""
        p = self.params
        if p.repetition_penalty != 1.0:
            seen = set(self.prompt_ids) | self.counts.keys()
            if seen:
                idx = torch.tensor(sorted(seen), device=logits.device)
                vals = logits[idx]
                vals = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
                logits[idx] = vals
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            idx = torch.tensor(list(self.counts.keys()), device=logits.device)
            cnt = torch.tensor(list(self.counts.values()), device=logits.device, dtype=logits.dtype)
            logits[idx] -= p.presence_penalty + p.frequency_penalty * cnt
        return logits

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that depends on history: the argmax of a whole batch can serve it."""
        p = self.params
        return (
            p.temperature < GREEDY_BELOW
            and p.repetition_penalty == 1.0
            and not p.presence_penalty
            and not p.frequency_penalty
        )

    def record(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1

    def sample(self, logits: torch.Tensor) -> int:
        logits = self.process(logits.float())
        p = self.params
        if p.temperature < GREEDY_BELOW:
            token = int(torch.argmax(logits))
        else:
            logits = logits / p.temperature
            if 0 < p.top_k < logits.shape[-1]:
                kth = torch.topk(logits, p.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                cumulative = torch.cumsum(probs, dim=-1)
                drop = cumulative - probs > p.top_p  # keep the smallest prefix reaching top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
            probs = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.record(token)
        return token


def sample_rows(samplers: Sequence[SequenceSampler], logits: torch.Tensor) -> list[int]:
    """One token per row of a (rows, vocab) logits batch, each with its row's own sampler.

    Plain greedy rows share one batched argmax (a per-row Python call costs more than the argmax
    itself at large batch sizes); every other row goes through its sampler alone.
    """
    greedy = [i for i, s in enumerate(samplers) if s.plain_greedy]
    tokens: list[int] = [0] * len(samplers)
    if greedy:
        picked = logits.argmax(dim=-1).tolist()  # argmax is exact in any dtype: no float() copy needed
        for i in greedy:
            token = int(picked[i])
            samplers[i].record(token)
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if not sampler.plain_greedy:
            tokens[i] = sampler.sample(logits[i])
    return tokens
