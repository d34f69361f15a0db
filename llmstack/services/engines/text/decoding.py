"""Turning sampled token ids into text: incremental detokenization, stop strings, the text and bytes of
single tokens for logprob entries, and which tokens carry control characters.  Shared by every engine."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

LOGPROB_FLOOR = -9999.0  # reported for impossible tokens: JSON has no -inf
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces come out right


class IncrementalDetokenizer:
    """Decodes only a short window per token (O(1) per step, not O(length)), and holds text back
    while a multi-byte character is incomplete."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character) once the sequence ends."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]


class StopStrings:
    """Finds stop strings across deltas.  Text that might be the start of a stop string is held back
    until it is known not to be one, so a client never sees a partial stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.matched: str | None = None  # the stop string that was reached

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was reached)."""
        if not self.stops:
            return delta, False
        self.text += delta
        start = max(0, self.emitted - self.longest + 1)
        hit = -1
        for stop in self.stops:
            idx = self.text.find(stop, start)
            if idx != -1 and (hit == -1 or idx < hit):
                hit = idx
                self.matched = stop
        if hit != -1:
            out = self.text[self.emitted : hit]
            self.emitted = len(self.text)
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        """The held-back tail, once the sequence ended for another reason."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte-to-printable-character table (GPT-2, Llama 3, Qwen)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Text and UTF-8 bytes of single tokens, for log-probability entries (cached per token id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            hit = (text, list(self._raw_bytes(token_id, text)))
            if len(self._cache) < 1_000_000:
                self._cache[token_id] = hit
        return hit

    def _raw_bytes(self, token_id: int, text: str) -> bytes:
        """A token that is part of a character decodes to U+FFFD: take its bytes from its vocabulary entry."""
        if "\ufffd" not in text:
            return text.encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            match = _BYTE_TOKEN.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            if piece and all(c in _BYTE_DECODER for c in piece):
                return bytes(_BYTE_DECODER[c] for c in piece)
        return text.encode()

    def entry(
        self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None, text: str | None = None
    ) -> dict[str, Any]:
        """OpenAI's chat logprob entry; `text` overrides the token's own text (the detokenizer's delta,
        so that entries concatenate to the returned text)."""
        own, raw = self.get(token_id)
        alternatives = []
        for alt, value in top or []:
            alt_text, alt_bytes = self.get(alt)
            alternatives.append({"token": alt_text, "logprob": value, "bytes": alt_bytes})
        return {
            "token": own if text is None else text,
            "logprob": logprob,
            "bytes": raw,
            "top_logprobs": alternatives,
        }


def control_token_ids(decoded_vocab: list[bytes]) -> list[int]:
    """Tokens with a raw control character (U+0000-U+001F).  JSON allows none inside strings and, with
    compact separators, needs no whitespace outside them, yet xgrammar's string rule lets most through."""
    return [i for i, raw in enumerate(decoded_vocab) if any(b < 0x20 for b in raw)]
