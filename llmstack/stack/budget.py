"""The memory budget's arithmetic: may a model load now, and which loaded models must go first.

Pure functions over figures (no processes, no clock), so every rule is testable on its own:
- a model that needs more than the whole budget (host, or any GPU it uses) never loads: refused with figures;
- otherwise, when the loaded models leave too little, the least recently used ones that may go are
  unloaded first: never a pinned one, never one loaded as `always`, never one with requests in flight;
- when even that is not enough (the rest is pinned or busy), the load waits (`Busy`), with the figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmstack.stack.units import format_size


@dataclass(frozen=True)
class Holder:
    """A model that holds memory now (loaded, loading or still unloading)."""

    name: str
    host_bytes: int
    gpu_bytes: dict[str, int] = field(default_factory=dict)
    last_used: float = 0.0  # wall clock; older goes first
    inflight: int = 0
    pinned: bool = False  # pin = true, or load = "always"
    settled: bool = True  # loaded (not loading or unloading): only such a model can be unloaded to make room

    def why_kept(self) -> str | None:
        if self.pinned:
            return "pinned"
        if self.inflight:
            return f"{self.inflight} request(s) in flight"
        if not self.settled:
            return "loading or unloading"
        return None


@dataclass(frozen=True)
class Budget:
    host_bytes: int | None = None
    gpu_bytes: int | None = None  # per GPU


@dataclass(frozen=True)
class Fits:
    evict: list[str]  # unload these (in this order) first; empty: it fits as things are


@dataclass(frozen=True)
class Busy:
    """It would fit, but what holds the memory cannot go now; try again when something changes."""

    message: str


@dataclass(frozen=True)
class Never:
    """It cannot fit even alone."""

    message: str


Decision = Fits | Busy | Never


def _over(budget: Budget, host: int, gpus: dict[str, int]) -> list[str]:
    """Which pools (``host``, ``gpu N``) the totals exceed."""
    out = []
    if budget.host_bytes is not None and host > budget.host_bytes:
        out.append("host")
    if budget.gpu_bytes is not None:
        out += [f"gpu {g}" for g, n in sorted(gpus.items()) if n > budget.gpu_bytes]
    return out


def _totals(holders: list[Holder]) -> tuple[int, dict[str, int]]:
    host = sum(h.host_bytes for h in holders)
    gpus: dict[str, int] = {}
    for h in holders:
        for g, n in h.gpu_bytes.items():
            gpus[g] = gpus.get(g, 0) + n
    return host, gpus


def plan_load(name: str, host_bytes: int, gpu_bytes: dict[str, int], holders: list[Holder], budget: Budget) -> Decision:
    """Whether model `name` (needing `host_bytes`, and `gpu_bytes` per GPU) may load beside `holders`."""
    alone = _over(budget, host_bytes, gpu_bytes)
    if alone:
        return Never(_never_message(name, host_bytes, gpu_bytes, budget, alone))
    others = [h for h in holders if h.name != name]
    candidates = sorted((h for h in others if h.why_kept() is None), key=lambda h: h.last_used)
    kept = list(others)
    evict: list[str] = []
    while True:
        host, gpus = _totals(kept)
        need_gpus = dict(gpus)
        for g, n in gpu_bytes.items():
            need_gpus[g] = need_gpus.get(g, 0) + n
        over = _over(budget, host + host_bytes, need_gpus)
        if not over:
            return Fits(evict)
        useful = [c for c in candidates if _frees(c, over)]
        if not useful:
            return Busy(_busy_message(name, host_bytes, kept, budget, over))
        victim = useful[0]
        candidates.remove(victim)
        kept.remove(victim)
        evict.append(victim.name)


def _frees(h: Holder, over: list[str]) -> bool:
    return any(
        (pool == "host" and h.host_bytes > 0) or h.gpu_bytes.get(pool.removeprefix("gpu "), 0) > 0 for pool in over
    )


def _never_message(name: str, host: int, gpus: dict[str, int], budget: Budget, over: list[str]) -> str:
    parts = []
    if "host" in over:
        parts.append(f"it needs {format_size(host)} but [stack] memory_budget is {format_size(budget.host_bytes)}")
    for pool in over:
        if pool.startswith("gpu "):
            g = pool.removeprefix("gpu ")
            parts.append(
                f"it needs {format_size(gpus[g])} on GPU {g} but [stack] gpu_memory_budget is "
                f"{format_size(budget.gpu_bytes)}"
            )
    return (
        f"model '{name}' cannot fit even alone: {'; '.join(parts)}. Raise the budget, or quantise the model "
        "(load_8bit, a GGUF file), or set its `memory` if the estimate is wrong"
    )


def _busy_message(name: str, need: int, kept: list[Holder], budget: Budget, over: list[str]) -> str:
    host, _ = _totals(kept)
    held = ", ".join(f"{h.name} {format_size(h.host_bytes)} ({h.why_kept() or 'idle'})" for h in kept) or "nothing"
    limit = f"{format_size(budget.host_bytes)}" if budget.host_bytes is not None else "no host limit"
    return (
        f"model '{name}' needs {format_size(need)}; {format_size(host)} of {limit} is held by models that "
        f"cannot be unloaded now ({held}; over: {', '.join(over)})"
    )


def start_problems(always: list[tuple[str, int]], budget: Budget) -> list[str]:
    """Models loaded at start (name, host bytes) that cannot fit the budget together: `up` refuses them."""
    if budget.host_bytes is None:
        return []
    total = sum(n for _, n in always)
    if total <= budget.host_bytes:
        return []
    listed = ", ".join(f"{name} {format_size(n)}" for name, n in always)
    return [
        f"the models loaded at start need {format_size(total)} together ({listed}) but [stack] memory_budget is "
        f'{format_size(budget.host_bytes)}; raise the budget, or make some of them load = "on_demand"'
    ]
