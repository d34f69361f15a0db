"""The schema of a named key, shared by stack.toml (`[[api.keys]]`) and keys files, and the keys file reader.

A keys file is TOML (any name) or JSON (a name ending in `.json`) holding a list `keys` of the same
entries as `[[api.keys]]`::

    [[keys]]
    name = "alice"
    key_sha256 = "9f86d0...15b0f00a08"   # or: key = "sk-..."
    models = ["gemma-*"]                 # globs; default: every model
    rpm = 60                             # requests per minute
    tpm = 20000                          # tokens per minute (prompt + completion)
    max_concurrent = 4
    priority = 1                         # higher goes first in a worker's queue; default 0
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class KeyRule(BaseModel):
    """One named key: its secret (or the secret's SHA-256), the models it may use and its limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="shown in logs, metrics and usage; never the key")
    key: SecretStr | None = Field(None, description="the key itself")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="hex SHA-256 of the key")
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description="model name globs")
    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens per minute, prompt and completion")
    max_concurrent: int | None = Field(None, ge=1, description="requests under way at once")
    priority: int = Field(0, ge=-1000, le=1000, description="higher goes first in a worker's queue")

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value()
            if not raw or raw != raw.strip() or any(c.isspace() for c in raw) or not raw.isprintable():
                raise ValueError("must be non-empty printable text without spaces")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, globs: list[str]) -> list[str]:
        if any(not g or g != g.strip() for g in globs):
            raise ValueError("each model pattern must be a non-empty name or glob such as 'gemma-*'")
        return globs

    @model_validator(mode="after")
    def _one_secret(self) -> KeyRule:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"key {self.name!r} needs exactly one of 'key' or 'key_sha256'")
        return self

    def digest(self) -> bytes:
        """SHA-256 of the key: what a presented key is compared against."""
        if self.key is not None:
            return hashlib.sha256(self.key.get_secret_value().encode()).digest()
        return bytes.fromhex(str(self.key_sha256))

    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None

    def env_entry(self) -> dict[str, Any]:
        """The rule as plain JSON, key included (for the environment of the API server, never for output)."""
        data = self.model_dump(exclude_none=True, exclude={"key"})
        if self.key is not None:
            data["key"] = self.key.get_secret_value()
        return data


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyRule] = Field(default_factory=list)


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file, the entry and the problem (never a key)."""


def validation_lines(exc: ValidationError) -> list[str]:
    """Pydantic's errors without the offending input (which may be a key)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        lines.append(f"{loc or '(top level)'}: {err['msg'].removeprefix('Value error, ')}")
    return lines


def check_unique(rules: list[KeyRule]) -> None:
    names: set[str] = set()
    digests: set[bytes] = set()
    for rule in rules:
        if rule.name in names:
            raise ValueError(f"two keys are named {rule.name!r}: names must be unique")
        digest = rule.digest()
        if digest in digests:
            raise ValueError(f"key {rule.name!r} has the same secret as another key: each key must be distinct")
        names.add(rule.name)
        digests.add(digest)


def parse_keys_file(path: Path) -> list[KeyRule]:
    """The rules of a keys file; `KeysFileError` says what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read the keys file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise KeysFileError(f"{path}: not UTF-8 text: {exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise KeysFileError(f"{path}: not valid {kind}: {exc}") from None
    try:
        rules = KeysFile.model_validate(data).keys
    except ValidationError as exc:
        raise KeysFileError(f"{path}: invalid keys file: " + "; ".join(validation_lines(exc))) from None
    try:
        check_unique(rules)
    except ValueError as exc:
        raise KeysFileError(f"{path}: {exc}") from None
    return rules


def flat_rules(keys: list[str]) -> list[KeyRule]:
    """Plain `api_keys` / `--api-keys`: unlimited keys named key-1, key-2, ... in the order given."""
    return [KeyRule(name=f"key-{i}", key=SecretStr(k)) for i, k in enumerate(keys, 1)]


def rules_from_env(raw: str) -> list[KeyRule]:
    """`LLMSTACK_API_KEY_RULES`: the stack's `[[api.keys]]` as a JSON list (a secret: environment only)."""
    try:
        return KeysFile.model_validate({"keys": json.loads(raw)}).keys
    except ValueError as exc:
        lines = validation_lines(exc) if isinstance(exc, ValidationError) else [str(exc)]
        raise KeysFileError("LLMSTACK_API_KEY_RULES: " + "; ".join(lines)) from None
