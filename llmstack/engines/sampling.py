"""Next-token selection from logits with OpenAI- and HF-style controls, one sequence or a batch."""

from __future__ import annotations

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
        self.counts[token] = self.counts.get(token, 0) + 1
        return token
