"""Stored responses (`store: true`), for `previous_response_id` and `GET`/`DELETE /v1/responses/{id}`.

`SQLiteStore` keeps them in `<state dir>/responses.sqlite3` (WAL): one writer thread takes every write
off the request path (a queue), readers use their own connections in the thread pool, and a write that
is still queued is answered from memory, so a second turn sent right after the first finds it.  Each
record belongs to the API key that created it.  Retention: the newest `max_responses`, none older than
`max_age` seconds.  `MemoryStore` does the same in memory, for an API server without a state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.common.errors import ServiceUnavailable

log = logging.getLogger("llmstack.api.store")

DEFAULT_MAX_RESPONSES = 10_000
DEFAULT_MAX_AGE = 30 * 24 * 3600.0  # OpenAI keeps stored responses for 30 days
_PRUNE_EVERY = 100  # writes between two retention passes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


@dataclass
class Stored:
    """One stored response: the response object and the whole conversation up to and including it."""

    id: str
    owner: str
    created_at: float
    response: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    """What the Responses endpoint needs of a store."""

    def __init__(self, max_responses: int = DEFAULT_MAX_RESPONSES, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.max_responses = max_responses
        self.max_age = max_age

    def _fresh(self, record: Stored | None, owner: str) -> Stored | None:
        if record is None or record.owner != owner or time.time() - record.created_at > self.max_age:
            return None
        return record

    async def save(self, record: Stored) -> None:
        raise NotImplementedError

    async def load(self, response_id: str, owner: str) -> Stored | None:
        raise NotImplementedError

    async def delete(self, response_id: str, owner: str) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        """Finish pending writes."""


class MemoryStore(ResponseStore):
    def __init__(self, max_responses: int = DEFAULT_MAX_RESPONSES, max_age: float = DEFAULT_MAX_AGE) -> None:
        super().__init__(max_responses, max_age)
        self.records: OrderedDict[str, Stored] = OrderedDict()

    async def save(self, record: Stored) -> None:
        self.records[record.id] = record
        while len(self.records) > self.max_responses:
            self.records.popitem(last=False)

    async def load(self, response_id: str, owner: str) -> Stored | None:
        return self._fresh(self.records.get(response_id), owner)

    async def delete(self, response_id: str, owner: str) -> bool:
        if await self.load(response_id, owner) is None:
            return False
        del self.records[response_id]
        return True


class SQLiteStore(ResponseStore):
    def __init__(
        self, path: Path, max_responses: int = DEFAULT_MAX_RESPONSES, max_age: float = DEFAULT_MAX_AGE
    ) -> None:
        """Opens (creating) the database; blocking: call it in a thread."""
        super().__init__(max_responses, max_age)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect()
        writer.execute("PRAGMA journal_mode=WAL")
        writer.executescript(_SCHEMA)
        writer.commit()
        self._prune(writer)  # before anything is read: what the limits drop is never answered
        self._lock = threading.Lock()
        self._pending: dict[str, Stored | None] = {}  # queued writes: a record, or None for a deletion
        self._queue: queue.Queue[tuple[str, Stored] | None] = queue.Queue()
        self._readers = threading.local()
        self._thread = threading.Thread(target=self._write_loop, args=(writer,), name="response-store", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # -- the one writer ---------------------------------------------------------------------------------
    def _write_loop(self, conn: sqlite3.Connection) -> None:
        writes, stop = 0, False
        while not stop:
            batch: list[tuple[str, Stored]] = []
            op = self._queue.get()
            while True:  # what queued up meanwhile goes into the same transaction
                if op is None:
                    stop = True
                    break
                batch.append(op)
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
            if not batch:
                continue
            try:
                self._apply(conn, batch)
            except sqlite3.Error:
                log.exception("could not write %d stored response(s) to %s", len(batch), self.path)
            self._settle(batch)
            writes += len(batch)
            if writes >= _PRUNE_EVERY:
                writes = 0
                self._prune(conn)
        conn.close()

    def _settle(self, batch: list[tuple[str, Stored]]) -> None:
        """Written: readers find these in the database now (unless a newer write is queued)."""
        with self._lock:
            for kind, record in batch:
                queued = self._pending.get(record.id, record)
                if (kind == "save" and queued is record) or (kind == "delete" and queued is None):
                    self._pending.pop(record.id, None)

    def _apply(self, conn: sqlite3.Connection, batch: list[tuple[str, Stored]]) -> None:
        with conn:
            for kind, r in batch:
                if kind == "save":
                    row = (r.id, r.owner, r.created_at, json.dumps(r.response), json.dumps(r.conversation))
                    conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)
                else:
                    conn.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (r.id, r.owner))

    def _prune(self, conn: sqlite3.Connection) -> None:
        try:
            with conn:
                conn.execute("DELETE FROM responses WHERE created_at < ?", (time.time() - self.max_age,))
                conn.execute(
                    "DELETE FROM responses WHERE id IN "
                    "(SELECT id FROM responses ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                    (self.max_responses,),
                )
        except sqlite3.Error:
            log.exception("could not apply the retention limits to %s", self.path)

    # -- the request path -------------------------------------------------------------------------------
    async def save(self, record: Stored) -> None:
        with self._lock:
            self._pending[record.id] = record
        self._queue.put(("save", record))

    async def load(self, response_id: str, owner: str) -> Stored | None:
        with self._lock:
            if response_id in self._pending:
                return self._fresh(self._pending[response_id], owner)
        try:
            record = await asyncio.to_thread(self._read, response_id)
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"the response store cannot be read: {exc}", code="store_unavailable") from exc
        return self._fresh(record, owner)

    def _read(self, response_id: str) -> Stored | None:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._readers.conn = self._connect()
        row = conn.execute(
            "SELECT id, owner, created_at, response, conversation FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        if row is None:
            return None
        return Stored(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]))

    async def delete(self, response_id: str, owner: str) -> bool:
        record = await self.load(response_id, owner)
        if record is None:
            return False
        with self._lock:
            self._pending[response_id] = None
        self._queue.put(("delete", record))
        return True

    async def close(self) -> None:
        self._queue.put(None)
        with contextlib.suppress(RuntimeError):
            await asyncio.to_thread(self._thread.join, 30.0)
