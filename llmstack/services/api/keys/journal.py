"""The usage journal: append-only segment files in the state directory, one JSON line per increment.

An increment is durable once its line is written: `os.write` hands it to the kernel, so it survives the
server being killed (like SQLite's WAL with `synchronous=NORMAL`; a power loss can take the last lines).
The write is a few hundred bytes into the page cache, as cheap as a log line, so it is done on the
request path; folding the lines into SQLite is the writer thread's job (`usage.py`).  A segment is
deleted once everything in it is in the database; at start, lines not in it yet are folded in first.

Line: ``[seq, day, key, model, requests, errors, prompt_tokens, completion_tokens]``; `seq` grows
across segments and restarts, and the database remembers the last one it holds.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import orjson

PREFIX = "usage-journal."
_SEGMENT = re.compile(rf"^{re.escape(PREFIX)}(\d+)$")

Entry = tuple[int, str, str, str, int, int, int, int]


def segments(state_dir: Path) -> list[Path]:
    """The journal's segment files, oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(state_dir):
            match = _SEGMENT.match(name)
            if match:
                found.append((int(match.group(1)), state_dir / name))
    return [path for _, path in sorted(found)]


def read_entries(path: Path) -> Iterator[Entry]:
    """The complete, well-formed lines of a segment (a torn last line is skipped)."""
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                continue
            try:
                seq, day, key, model, *counts = orjson.loads(line)
                yield (int(seq), str(day), str(key), str(model), *(int(c) for c in counts))  # type: ignore[misc]
            except (ValueError, TypeError):
                continue


class Journal:
    """The segment being written; `rotate` starts the next one when it has grown large."""

    def __init__(self, state_dir: Path, segment_bytes: int = 8 * 2**20) -> None:
        self.state_dir = state_dir
        self.segment_bytes = segment_bytes
        existing = segments(state_dir)
        self.number = int(existing[-1].name.removeprefix(PREFIX)) + 1 if existing else 1
        self.path, self.fd = self._open(self.number)
        self.size = 0

    def _open(self, number: int) -> tuple[Path, int]:
        path = self.state_dir / f"{PREFIX}{number:08d}"
        return path, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, entry: Entry) -> Path | None:
        """Write one line; returns the previous segment's path when this write filled it up (rotated)."""
        line = orjson.dumps(entry) + b"\n"
        os.write(self.fd, line)
        self.size += len(line)
        if self.size < self.segment_bytes:
            return None
        full = self.path
        os.close(self.fd)
        self.number += 1
        self.path, self.fd = self._open(self.number)
        self.size = 0
        return full

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
