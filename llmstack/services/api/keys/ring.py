"""The live set of keys.  A presented key is hashed once with SHA-256 and looked up by digest, then the
digests are compared with `hmac.compare_digest`: the cost is the same for 1 key or 100, and timing tells
nothing about any configured key (an attacker would have to invert SHA-256 to use what it leaks)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from fnmatch import fnmatchcase

from llmstack.services.api.keys.limits import KeyLimits
from llmstack.services.api.keys.rules import KeyRule

ANONYMOUS = "anonymous"  # the name usage is recorded under when the server has no keys at all
_NO_DIGEST = bytes(32)


@dataclass(frozen=True, slots=True)
class Key:
    """One configured key as the server uses it; `limits` lives as long as the name does."""

    name: str
    digest: bytes
    rule: KeyRule
    limits: KeyLimits
    every_model: bool

    def allows(self, model: str) -> bool:
        return self.every_model or any(fnmatchcase(model, glob) for glob in self.rule.models)

    @property
    def limited(self) -> bool:
        return self.rule.limited()


class KeyRing:
    """An immutable snapshot of the keys; a reload builds a new one and swaps it in."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys
        self._by_digest = {k.digest: k for k in keys}

    @classmethod
    def build(cls, rules: list[KeyRule], limits: dict[str, KeyLimits]) -> KeyRing:
        """Keys for `rules`; the limit state of a name already in `limits` carries on (updated in place)."""
        keys = []
        for rule in rules:
            state = limits.get(rule.name)
            if state is None:
                state = limits[rule.name] = KeyLimits(rule)
            else:
                state.apply(rule)
            keys.append(Key(rule.name, rule.digest(), rule, state, every_model="*" in rule.models))
        return cls(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def identify(self, token: str) -> Key | None:
        digest = hashlib.sha256(token.encode()).digest()
        key = self._by_digest.get(digest)
        expected = key.digest if key is not None else _NO_DIGEST
        return key if hmac.compare_digest(digest, expected) and key is not None else None

    def names(self) -> list[str]:
        return [k.name for k in self.keys]
