"""How many requests a worker generates for at once, and how many may wait: beyond that, 429."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llmstack.common.errors import Overloaded


class Admission:
    """A concurrency limit with a bounded queue: beyond `max_queue` waiting, requests get 429."""

    def __init__(self, limit: int, max_queue: int) -> None:
        self._sem = asyncio.Semaphore(limit)
        self.max_queue = max_queue
        self.waiting = 0
        self.running = 0

    @property
    def full(self) -> bool:
        """No free slot and `max_queue` already waiting (so `max_queue = 0` means: no waiting at all)."""
        return self._sem.locked() and self.waiting >= self.max_queue

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.full:
            raise Overloaded(f"worker queue is full ({self.max_queue} waiting)", retry_after=1)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()
