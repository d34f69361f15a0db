"""Automatic prefix caching for the transformers engine: a radix tree of token sequences whose nodes hold the
keys/values of their tokens (`slots.Span`), so a prompt that starts like an earlier one (a shared system
prompt, the previous turns of a chat) is prefilled only from where they differ.

A node holds, for full-attention layers, every position of its span; for sliding-window layers only the
newest positions it had (a window layer's cache keeps no more).  A hit at position c is usable only if
the positions a window layer still needs there, (c - W, c), are all held along the path: otherwise the
hit is cut back to the deepest point where they are (at worst, no hit).  A hit always leaves the
prompt's last token to compute, because the first output token needs its logits.

Nodes are shared by every sequence that passes through them (the tree dedups a common prefix), evicted
least recently used first, leaves first, whenever the engine needs their room for running sequences:
the tree and the running batch share one budget of cache positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmstack.services.engines.hf.layout import KVLayout
from llmstack.services.engines.hf.slots import RowSource, Span


class _Node:
    __slots__ = ("tokens", "span", "children", "parent", "last_used")

    def __init__(self, tokens: tuple[int, ...], span: Span | None, parent: _Node | None) -> None:
        self.tokens = tokens
        self.span = span
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.last_used = 0


@dataclass
class Hit:
    """A usable prefix: its length and the spans that hold it, in order (the last may run past it)."""

    length: int
    spans: list[Span]


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, served from the cache
    held_positions: float = 0.0
    nodes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def _common(a: tuple[int, ...], b: list[int]) -> int:
    """Length of the common prefix of two token runs (binary search on slice equality: C-speed compares)."""
    hi = min(len(a), len(b))
    if tuple(b[:hi]) == a[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(b[:mid]) == a[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _split_span(span: Span, at: int) -> tuple[Span, Span]:
    """Positions [start, at) and [at, end) of a span, as copies (so eviction frees what it counts)."""
    cut = at - span.start
    head_full = [(k[:, :cut].clone(), v[:, :cut].clone()) for k, v in span.full]
    tail_full = [(k[:, cut:].clone(), v[:, cut:].clone()) for k, v in span.full]
    head_ws, tail_ws = min(span.window_start, at), max(span.window_start, at)
    wcut = max(0, at - span.window_start)
    head_win = [(k[:, :wcut].clone(), v[:, :wcut].clone()) for k, v in span.window]
    tail_win = [(k[:, wcut:].clone(), v[:, wcut:].clone()) for k, v in span.window]
    return Span(span.start, at, head_full, head_ws, head_win), Span(at, span.end, tail_full, tail_ws, tail_win)


class PrefixCache:
    """The tree; engine thread only."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.root = _Node((), None, None)
        self.stats = PrefixStats()
        self._clock = 0

    @property
    def held(self) -> float:
        return self.stats.held_positions

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _walk(self, tokens: list[int], limit: int) -> tuple[list[tuple[_Node, int]], int]:
        """The path a token run takes: (node, tokens of it matched) pairs and the matched length."""
        node, pos, path = self.root, 0, []
        while pos < limit:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common(child.tokens, tokens[pos:limit])
            path.append((child, n))
            pos += n
            if n < len(child.tokens):
                break
            node = child
        return path, pos

    def _window_held(self, path: list[tuple[_Node, int]], cut: int) -> bool:
        """Whether the window layers' positions (cut - W, cut) are held along the path."""
        window = self.layout.window
        if window is None:
            return True
        need_from = max(0, cut - (window - 1))
        for node, _ in path:
            span = node.span
            assert span is not None
            lo, hi = max(span.start, need_from), min(span.end, cut)
            if lo < hi and span.window_start > lo:
                return False
        return True

    def match(self, tokens: list[int]) -> Hit:
        """The longest usable cached prefix of a prompt (counted in the hit rate)."""
        self.stats.queried_tokens += len(tokens)
        path, matched = self._walk(tokens, len(tokens) - 1)
        cuts = [matched] + [node.span.end for node, n in reversed(path) if n == len(node.tokens)]  # type: ignore[union-attr]
        for cut in cuts:
            if cut > 0 and self._window_held(path, cut):
                used = [node for node, _ in path if node.span is not None and node.span.start < cut]
                now = self._tick()
                for node in used:
                    node.last_used = now
                self.stats.hit_tokens += cut
                return Hit(cut, [node.span for node in used])  # type: ignore[misc]
        return Hit(0, [])

    def insert(self, tokens: list[int], source: RowSource) -> None:
        """Add a sequence's cached positions: `tokens` are its first len(tokens) tokens, `source` the row
        holding their keys/values.  Only what the tree lacks is copied: the span past the longest cached
        prefix, and window positions of the nodes on the way that the row holds and they do not."""
        path, matched = self._walk(tokens, len(tokens))
        now = self._tick()
        parent = self.root
        for node, n in path:
            if n < len(node.tokens):
                node = self._split(node, n)
            node.last_used = now
            self._fill_window(node, source, source.keep)
            parent = node
        if matched < len(tokens):
            span = source.span(matched)
            if span.start != matched or span.end != len(tokens):
                raise ValueError(f"the row gave positions [{span.start}, {span.end}), not [{matched}, {len(tokens)})")
            child = _Node(tuple(tokens[matched:]), span, parent)
            child.last_used = now
            parent.children[child.tokens[0]] = child
            self.stats.held_positions += span.positions(self.layout)
            self.stats.nodes += 1

    def _fill_window(self, node: _Node, source: RowSource, keep: int) -> None:
        """Extend a node's window positions back (up to its newest `keep`) from a row that holds them."""
        span = node.span
        assert span is not None
        if self.layout.window is None:
            return
        want = max(span.start, span.end - keep, source.window_held_from())
        if want >= span.window_start:
            return
        extra = source.window(want, span.window_start)
        span.window = [
            (torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1))
            for (ek, ev), (k, v) in zip(extra, span.window, strict=True)
        ]
        before = span.positions(self.layout)
        span.window_start = want
        self.stats.held_positions += span.positions(self.layout) - before

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut a node after its first n tokens; returns the new upper node."""
        assert node.span is not None and node.parent is not None and 0 < n < len(node.tokens)
        head, tail = _split_span(node.span, node.span.start + n)
        upper = _Node(node.tokens[:n], head, node.parent)
        upper.last_used = node.last_used
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.span, node.parent = node.tokens[n:], tail, upper
        upper.children[node.tokens[0]] = node
        self.stats.nodes += 1
        return upper

    def evict(self, positions: float) -> float:
        """Drop least recently used leaves until at least `positions` are freed (or the tree is empty)."""
        freed = 0.0
        while freed < positions:
            leaves = self._leaves()
            if not leaves:
                break
            for leaf in sorted(leaves, key=lambda node: node.last_used):
                freed += self._remove(leaf)
                if freed >= positions:
                    break
        return freed

    def clear(self) -> None:
        self.evict(float("inf"))

    def _leaves(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out

    def _remove(self, leaf: _Node) -> float:
        assert leaf.parent is not None and leaf.span is not None
        del leaf.parent.children[leaf.tokens[0]]
        size = leaf.span.positions(self.layout)
        self.stats.held_positions = max(0.0, self.stats.held_positions - size)
        self.stats.nodes -= 1
        leaf.span = None
        return size


def span_bytes(span: Span) -> int:
    """Memory a span holds (for logs and tests)."""
    tensors: list[torch.Tensor] = [t for pair in (*span.full, *span.window) for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors)
