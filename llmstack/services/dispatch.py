"""Choosing a worker for a request: shared by the controller's lookup and the API server's router."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from llmstack.common.wire import DispatchMethod


@dataclass(slots=True)
class Candidate:
    address: str
    speed: float
    queue_length: float


def choose(candidates: Sequence[Candidate], method: DispatchMethod, rng: random.Random) -> Candidate:
    """`lottery`: random, weighted by speed.  `shortest_queue`: least queue per unit of speed, with
    ties broken at random so equal workers share the load (FastChat always takes the first)."""
    if not candidates:
        raise ValueError("no candidates")
    if len(candidates) == 1:
        return candidates[0]
    if method == "lottery":
        return rng.choices(candidates, weights=[max(c.speed, 1e-6) for c in candidates])[0]
    scores = [c.queue_length / max(c.speed, 1e-6) for c in candidates]
    best = min(scores)
    return rng.choice([c for c, s in zip(candidates, scores, strict=True) if s <= best + 1e-9])
