"""Where the keys come from: fixed rules (plain `--api-keys`, the stack's `[[api.keys]]`) plus an optional
keys file, reloaded when it changes (polled) and on SIGHUP.  A file that cannot be used at start stops the
start; one that breaks later is logged and the last good keys stay in force."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from llmstack.services.api.keys.limits import KeyLimits
from llmstack.services.api.keys.ring import KeyRing
from llmstack.services.api.keys.rules import KeyRule, KeysFileError, check_unique, parse_keys_file

log = logging.getLogger("llmstack.api.keys")

Stamp = tuple[int, int, int] | None


class KeysSource:
    def __init__(self, rules: list[KeyRule], keys_file: Path | None = None, *, poll_interval: float = 0.5) -> None:
        self.rules = rules
        self.keys_file = keys_file
        self.poll_interval = poll_interval
        self.limits: dict[str, KeyLimits] = {}  # every name seen since start: its limits and counters
        self.reloads = 0
        self.reload_errors = 0
        self._stamp: Stamp = self._file_stamp()
        self.ring = self._build(parse_keys_file(keys_file) if keys_file is not None else [])

    @property
    def required(self) -> bool:
        """Whether requests must present a key: any key configured, or a keys file (even an empty one)."""
        return bool(self.rules) or self.keys_file is not None

    def _build(self, file_rules: list[KeyRule]) -> KeyRing:
        rules = [*self.rules, *file_rules]
        try:
            check_unique(rules)
        except ValueError as exc:
            where = f"{self.keys_file} with the configured keys" if self.keys_file else "the configured keys"
            raise KeysFileError(f"{where}: {exc}") from None
        return KeyRing.build(rules, self.limits)

    def _file_stamp(self) -> Stamp:
        if self.keys_file is None:
            return None
        try:
            st = os.stat(self.keys_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def reload(self, reason: str) -> bool:
        """Read the keys file again; keep the keys in force when it cannot be used."""
        if self.keys_file is None:
            return False
        self._stamp = self._file_stamp()
        try:
            rules = await asyncio.to_thread(parse_keys_file, self.keys_file)
            ring = self._build(rules)
        except KeysFileError as exc:
            self.reload_errors += 1
            log.error("%s; keeping the %d keys in force", exc, len(self.ring))
            return False
        before = set(self.ring.names())
        self.ring = ring
        self.reloads += 1
        added = sorted(set(ring.names()) - before)
        removed = sorted(before - set(ring.names()))
        log.info(
            "keys reloaded from %s (%s): %d keys; added %s; removed %s",
            self.keys_file, reason, len(ring), ", ".join(added) or "none", ", ".join(removed) or "none",
        )  # fmt: skip
        return True

    async def changed(self) -> bool:
        """Reload when the file's modification time, size or inode moved since the last look."""
        if self.keys_file is None or self._file_stamp() == self._stamp:
            return False
        return await self.reload("file changed")
