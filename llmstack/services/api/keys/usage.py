"""Usage per key, model and day (UTC) in SQLite: requests, errors, prompt and completion tokens.

`record(usage)` writes the increment to the journal (`journal.py`) and queues it for the writer thread;
once it returns, the increment survives the server being killed.  The grant records a response's usage
before the response's last part is passed on, so whatever a client was told is durable.  The writer
thread owns the database connection (WAL journal): every `commit_interval` seconds it adds up what was
queued, commits it in one transaction together with the journal position it reached, and deletes
journal segments that are wholly in the database.  At start, journal lines the database does not hold
yet (the server was killed) are folded in first.

`read_usage` (for `llmstack usage`) reads the database read-only and adds the journal lines it does not
hold yet, so it is exact while the server runs and after a crash."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.services.api.keys.journal import Entry, Journal, read_entries, segments

log = logging.getLogger("llmstack.api.usage")

USAGE_FILE = "usage.db"
COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, model)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY CHECK (id = 1), applied_seq INTEGER NOT NULL);
INSERT OR IGNORE INTO journal (id, applied_seq) VALUES (1, 0);
PRAGMA user_version = 1;
"""
_UPSERT = """
INSERT INTO usage (day, key, model, requests, errors, prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key, model) DO UPDATE SET
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


@dataclass(frozen=True, slots=True)
class Usage:
    """An increment for one key and model."""

    key: str
    model: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _totals(entries: Iterable[Entry]) -> dict[tuple[str, str, str], list[int]]:
    totals: dict[tuple[str, str, str], list[int]] = {}
    for _, day, key, model, *counts in entries:
        row = totals.setdefault((day, key, model), [0, 0, 0, 0])
        for i, value in enumerate(counts):
            row[i] += value
    return totals


def _apply(conn: sqlite3.Connection, entries: list[Entry]) -> None:
    """One transaction: the entries' sums and the journal position they reach."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = [(*where, *counts) for where, counts in _totals(entries).items()]
        conn.executemany(_UPSERT, rows)
        conn.execute("UPDATE journal SET applied_seq = max(applied_seq, ?)", (max(e[0] for e in entries),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class StateDirInUse(RuntimeError):
    """Another API server records usage in this state directory."""


def _lock_state(state_dir: Path) -> int:
    """An exclusive lock on the state directory's usage, held while the process lives (the kernel drops it
    when the process dies, however it dies)."""
    fd = os.open(state_dir / "usage.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirInUse(
            f"{state_dir}: another API server records usage here; give each API server its own --state-dir"
        ) from None
    return fd


class UsageStore:
    """The usage database of one state directory, and its single writer."""

    def __init__(self, state_dir: Path, *, commit_interval: float = 0.25, segment_bytes: int = 8 * 2**20) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / USAGE_FILE
        self.commit_interval = commit_interval
        self.write_errors = 0
        self.commits = 0
        self._lock = _lock_state(state_dir)
        self._conn = _connect(self.path)  # here, so a file that cannot be used fails the start, not a request
        self._conn.executescript(_SCHEMA)
        self._seq = self._recover(state_dir)
        self._journal = Journal(state_dir, segment_bytes)
        self._queue: collections.deque[Entry | Path] = collections.deque()  # entries, then segments to delete
        self._day = ("", 0.0)  # the UTC day and when it ends
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def _recover(self, state_dir: Path) -> int:
        """Fold journal lines the database does not hold (the last run was killed); returns the last seq."""
        (applied,) = self._conn.execute("SELECT applied_seq FROM journal").fetchone()
        old = segments(state_dir)
        entries = [e for path in old for e in read_entries(path)]
        missing = [e for e in entries if e[0] > applied]
        if missing:
            _apply(self._conn, missing)
            log.info("usage: recovered %d increments from the journal", len(missing))
        for path in old:
            path.unlink()
        return max([applied, *(e[0] for e in entries)])

    def record(self, usage: Usage) -> None:
        """Durable when this returns (the journal line is written); the database follows within
        `commit_interval` seconds."""
        now = time.time()
        if now >= self._day[1]:
            midnight = (int(now) // 86400 + 1) * 86400
            self._day = (time.strftime("%Y-%m-%d", time.gmtime(now)), float(midnight))
        self._seq += 1
        entry: Entry = (
            self._seq, self._day[0], usage.key, usage.model,
            usage.requests, usage.errors, usage.prompt_tokens, usage.completion_tokens,
        )  # fmt: skip
        full = self._journal.append(entry)
        self._queue.append(entry)
        if full is not None:
            self._queue.append(full)  # deleted once the entries before it are committed

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the writer (and drop the journal: it is all in the database)."""
        self._stop.set()
        self._thread.join(timeout)
        self._journal.close()
        if not self._queue and self.write_errors == 0:
            with contextlib.suppress(OSError):
                self._journal.path.unlink()
        self._conn.close()
        os.close(self._lock)

    def _run(self) -> None:
        while not self._stop.wait(self.commit_interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        taken: list[Entry | Path] = []
        with contextlib.suppress(IndexError):
            while True:
                taken.append(self._queue.popleft())
        entries = [e for e in taken if not isinstance(e, Path)]
        if entries:
            try:
                _apply(self._conn, entries)
                self.commits += 1
            except sqlite3.Error as exc:  # accounting must not take serving down: the journal keeps them
                self.write_errors += 1
                log.error("could not record usage in %s (kept in the journal): %s", self.path, exc)
                self._queue.extendleft(reversed(taken))
                return
        for path in taken:
            if isinstance(path, Path):
                with contextlib.suppress(OSError):
                    path.unlink()


def read_usage(path: Path, *, since: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
    """Rows (day, key, model and the counts) of a usage file and its journal, oldest first; read-only and
    safe while the server writes.  `since` is a day, YYYY-MM-DD (UTC)."""
    for _ in range(5):  # a journal segment deleted while it was being read: read again
        try:
            totals = _read_once(path)
            break
        except FileNotFoundError:
            continue
    else:
        totals = _read_once(path)
    names = ("day", "key", "model", *COUNTS)
    rows = [dict(zip(names, (*where, *counts), strict=True)) for where, counts in sorted(totals.items())]
    return [r for r in rows if r["day"] >= (since or "") and (key is None or r["key"] == key)]


def _read_once(path: Path) -> dict[tuple[str, str, str], list[int]]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        conn.execute("BEGIN")  # one snapshot: the rows and the journal position they include
        rows = conn.execute(f"SELECT day, key, model, {', '.join(COUNTS)} FROM usage").fetchall()
        (applied,) = conn.execute("SELECT applied_seq FROM journal").fetchone()
        conn.execute("COMMIT")
    finally:
        conn.close()
    totals = {(day, k, model): list(counts) for day, k, model, *counts in rows}
    pending = [e for seg in segments(path.parent) for e in read_entries(seg) if e[0] > applied]
    for where, counts in _totals(pending).items():
        row = totals.setdefault(where, [0, 0, 0, 0])
        for i, value in enumerate(counts):
            row[i] += value
    return totals
