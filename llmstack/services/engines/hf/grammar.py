"""Constrained decoding for the transformers engine: JSON and JSON-schema grammars through xgrammar.

A grammar is compiled once per distinct schema (xgrammar caches compiled grammars by content); each
sequence gets its own matcher, which masks the logits of tokens the grammar forbids next and advances
with every sampled token.  Once the grammar is complete only the end-of-sequence tokens are allowed.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from llmstack.common.errors import InvalidRequest
from llmstack.common.wire import Structure
from llmstack.services.engines.text.decoding import control_token_ids


class GrammarConstraint:
    """One sequence's position in a compiled grammar (implements `sampling.TokenConstraint`)."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int, banned: torch.Tensor) -> None:
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._banned = banned

    def mask(self, logits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.view(1, -1)
        bitmask = self._bitmask if row.device.type == "cpu" else self._bitmask.to(row.device)
        self._xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=self._vocab_size)
        if self._banned.numel():
            if self._banned.device != logits.device:
                self._banned = self._banned.to(logits.device)  # once per sequence, not per token
            logits[self._banned] = float("-inf")

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    @property
    def finished(self) -> bool:
        return bool(self._matcher.is_terminated())


class Grammars:
    """Compiles `Structure`s for one tokenizer and hands out per-sequence constraints."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._banned = torch.tensor(control_token_ids(info.decoded_vocab), dtype=torch.long)

    def compile(self, structure: Structure) -> Any:
        """The compiled grammar; an invalid or unsupported schema is the request's fault (400)."""
        try:
            if structure.kind == "json_object":
                # any object; strict_mode off so that it may have any properties
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            schema = json.dumps(structure.json_schema or {}, sort_keys=True)
            return self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the reason
            raise InvalidRequest(
                f"the JSON schema cannot be used for constrained decoding: {exc}", param="response_format"
            ) from exc

    def constraint(self, structure: Structure) -> GrammarConstraint:
        return GrammarConstraint(self._xgr, self.compile(structure), self.vocab_size, self._banned)
