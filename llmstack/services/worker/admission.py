"""How many requests a worker generates for at once, and how many may wait: beyond that, 429.  Waiting
requests are served by priority (higher first), then in arrival order."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llmstack.common.errors import Overloaded


class Admission:
    """A concurrency limit with a bounded priority queue: beyond `max_queue` waiting, requests get 429.

    A finished request hands its slot straight to the first waiter (so `running` never dips below the
    limit while anyone waits, and a newcomer cannot overtake the queue)."""

    def __init__(self, limit: int, max_queue: int) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.waiting = 0
        self.running = 0
        self._queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def full(self) -> bool:
        """No free slot and `max_queue` already waiting (so `max_queue = 0` means: no waiting at all)."""
        return self.running >= self.limit and self.waiting >= self.max_queue

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        if self.full:
            raise Overloaded(f"worker queue is full ({self.max_queue} waiting)", retry_after=1)
        if self.running < self.limit:  # nobody waits when a slot is free (slots are handed over)
            self.running += 1
        else:
            await self._wait(priority)
        try:
            yield
        finally:
            self._release()

    async def _wait(self, priority: int) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (-priority, next(self._arrivals), turn))
        self.waiting += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # the slot was handed over just as we were cancelled
                self._release()
            raise
        finally:
            self.waiting -= 1

    def _release(self) -> None:
        while self._queue:
            _, _, turn = heapq.heappop(self._queue)
            if not turn.done():  # skip waiters that gave up
                turn.set_result(None)
                return
        self.running -= 1
