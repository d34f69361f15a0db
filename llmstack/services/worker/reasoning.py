"""Reasoning on the worker: a thinking model's streamed text split into its reasoning and its answer.

Parsers, chosen per model with `--reasoning-parser` (none by default):

- `qwen3`: a `<think>...</think>` block at the very start of the output (after whitespace) is reasoning;
  output that starts with anything else is all answer (Qwen3 with `enable_thinking: false`, or a model
  that simply did not think).  When the rendered prompt itself ends inside an opened `<think>`, the
  output starts in the reasoning.
- `deepseek_r1`: the output starts in the reasoning (DeepSeek-R1 and its distills think first, and their
  templates may or may not write the opening tag) and the answer follows `</think>`; an explicit leading
  `<think>` is dropped.

Readers are streaming-safe: text that may be the start of a tag (`<thi`, `</th`) is held back until it
is known not to be one, so a tag split across chunks is never shown.  The newlines that frame a block
(`<think>\\n ... \\n</think>\\n\\n`) belong to neither part.
"""

from __future__ import annotations

import enum

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class _State(enum.Enum):
    START = "start"  # nothing but whitespace yet: a block may still open
    THINKING = "thinking"
    ANSWER = "answer"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkReader:
    """Splits one choice's text at a `<think>...</think>` block as it streams."""

    def __init__(self, *, starts_thinking: bool = False) -> None:
        self.state = _State.THINKING if starts_thinking else _State.START
        self.may_open = starts_thinking  # an explicit opening tag right away is swallowed
        self.pending = ""
        self.trim = True  # drop the newlines that open the reasoning or the answer

    @property
    def thinking(self) -> bool:
        return self.state is _State.THINKING

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) that can be shown now."""
        self.pending += text
        reasoning: list[str] = []
        answer: list[str] = []
        while self.pending:
            if self.state is _State.START or self.may_open:
                if not self._opening():
                    break
            elif self.state is _State.THINKING:
                if not self._thinking(reasoning):
                    break
            else:
                self._answer(self.pending, answer)
                self.pending = ""
        return "".join(reasoning), "".join(answer)

    def _opening(self) -> bool:
        """Look for the opening tag; False while it is still undecided."""
        head = self.pending.lstrip()
        if head.startswith(THINK_OPEN):
            self.pending = head[len(THINK_OPEN) :]
            self.state, self.may_open, self.trim = _State.THINKING, False, True
            return True
        if THINK_OPEN.startswith(head):  # empty, or a partial tag: wait for more
            return False
        self.may_open = False
        if self.state is _State.START:
            self.state = _State.ANSWER
            self.trim = False  # no block: the answer is the output as written
        return True

    def _thinking(self, into: list[str]) -> bool:
        end = self.pending.find(THINK_CLOSE)
        if end != -1:
            self._reasoning(self.pending[:end].rstrip("\n"), into)
            self.pending = self.pending[end + len(THINK_CLOSE) :]
            self.state, self.trim = _State.ANSWER, True
            return True
        safe = len(self.pending) - _partial_suffix(self.pending, THINK_CLOSE)
        safe = len(self.pending[:safe].rstrip("\n"))  # trailing newlines may frame the closing tag
        self._reasoning(self.pending[:safe], into)
        self.pending = self.pending[safe:]
        return False

    def _reasoning(self, text: str, into: list[str]) -> None:
        if self.trim:
            text = text.lstrip("\n")
            self.trim = not text
        if text:
            into.append(text)

    def _answer(self, text: str, into: list[str]) -> None:
        if self.trim:
            text = text.lstrip("\n")
            self.trim = not text
        if text:
            into.append(text)

    def finish(self) -> tuple[str, str]:
        """Whatever is still held back, once the output ended."""
        pending, self.pending = self.pending, ""
        if self.state is _State.THINKING:
            reasoning: list[str] = []
            self._reasoning(pending.rstrip("\n"), reasoning)
            return "".join(reasoning), ""
        if self.state is _State.START:
            self.state = _State.ANSWER
            return "", pending
        answer: list[str] = []
        self._answer(pending, answer)
        return "", "".join(answer)


#: Parsers by the name `--reasoning-parser` takes.
PARSERS: tuple[str, ...] = ("deepseek_r1", "qwen3")


def prompt_opens_reasoning(prompt_tail: str) -> bool:
    """Whether a rendered prompt ends inside an opened `<think>` block (the template started it)."""
    return prompt_tail.rstrip().endswith(THINK_OPEN)


def reader_for(parser: str | None, prompt_tail: str = "") -> ThinkReader | None:
    """A reader for one choice, or None when the model has no reasoning parser."""
    if not parser:
        return None
    if parser == "deepseek_r1":
        return ThinkReader(starts_thinking=True)
    if parser == "qwen3":
        return ThinkReader(starts_thinking=prompt_opens_reasoning(prompt_tail))
    raise ValueError(f"unknown reasoning parser {parser!r}; choose one of {', '.join(PARSERS)}")
