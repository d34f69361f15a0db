"""Usage per key, model and day (UTC) in SQLite: requests, errors, prompt and completion tokens.

One writer thread owns the connection (WAL journal).  Requests hand it increments through a queue; it
takes everything queued, adds it up, commits it in one transaction and only then wakes the requests that
wait for it (`await record(...)`): a group commit, so the event loop never blocks on the disk and the
cost per request is one queue put and one wake-up.  A response's usage is committed before the response
ends, so whatever a client was told survives a crash of the server (`synchronous=NORMAL` in WAL mode: a
commit survives the process being killed; only a power loss can take the last commits).

`llmstack usage` reads the same file (read-only) while the server runs."""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_Item = tuple[Usage, asyncio.AbstractEventLoop | None, asyncio.Future[None] | None]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class UsageStore:
    """The writer: `await record(usage)` returns once the increment is committed."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / USAGE_FILE
        self.write_errors = 0
        self.commits = 0
        conn = _connect(self.path)  # here, so a file that cannot be used fails the start, not a request
        try:
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    async def record(self, usage: Usage) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((usage, loop, done))
        await done

    def record_nowait(self, usage: Usage) -> None:
        """For increments nobody waits on (a request that failed or whose client left)."""
        self._queue.put((usage, None, None))

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        conn = _connect(self.path)
        try:
            stop = False
            while not stop:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                items = [item for item in batch if item is not None]
                stop = len(items) < len(batch)
                if items:
                    self._commit(conn, items)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, items: list[_Item]) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        totals: dict[tuple[str, str], list[int]] = {}
        for usage, _, _ in items:
            row = totals.setdefault((usage.key, usage.model), [0, 0, 0, 0])
            row[0] += usage.requests
            row[1] += usage.errors
            row[2] += usage.prompt_tokens
            row[3] += usage.completion_tokens
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_UPSERT, [(day, key, model, *counts) for (key, model), counts in totals.items()])
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:  # accounting must not take serving down with it: log, count, go on
            self.write_errors += 1
            log.error("could not record usage in %s: %s", self.path, exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, loop, done in items:
            if loop is not None and done is not None:
                waiting.setdefault(loop, []).append(done)
        for loop, futures in waiting.items():
            try:
                loop.call_soon_threadsafe(_wake, futures)
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass


def _wake(futures: Iterable[asyncio.Future[None]]) -> None:
    for done in futures:
        if not done.done():  # a request cancelled meanwhile has a cancelled future
            done.set_result(None)


def read_usage(path: Path, *, since: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
    """Rows (day, key, model and the counts) from a usage file, oldest first; read-only, safe while the
    server writes.  `since` is a day, YYYY-MM-DD (UTC)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        query = f"SELECT day, key, model, {', '.join(COUNTS)} FROM usage WHERE day >= ?"
        args: list[str] = [since or ""]
        if key is not None:
            query += " AND key = ?"
            args.append(key)
        rows = conn.execute(query + " ORDER BY day, key, model", args).fetchall()
    finally:
        conn.close()
    names = ("day", "key", "model", *COUNTS)
    return [dict(zip(names, row, strict=True)) for row in rows]
