"""Idle-read and total timeouts of upstream exchanges, enforced by one periodic sweep.

aiohttp's own ``sock_read`` timeout re-arms a timer on every packet received and its
``total`` arms one per request: measured, a noticeable share of the proxy's CPU. Here each
exchange only records when its deadlines fall (a float store per chunk), and one timer,
running only while exchanges are in flight, cancels the task of any exchange that overran.
Timeouts are therefore up to ``RESOLUTION`` late, which is nothing next to seconds.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

RESOLUTION = 0.05  # seconds between sweeps while exchanges are in flight


class Exchange:
    """One upstream exchange's deadlines; ``expired`` tells a timeout from other cancels."""

    __slots__ = ("_loop", "expired", "read", "read_deadline", "task", "total_deadline")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], read: float, total: float
    ) -> None:
        now = loop.time()
        self._loop = loop
        self.task = task
        self.read = read
        self.read_deadline = now + read
        self.total_deadline = now + total
        self.expired = False

    def touch(self) -> None:
        """The upstream made progress: the idle-read clock starts again."""
        self.read_deadline = self._loop.time() + self.read

    def pause(self) -> None:
        """Waiting on the client (a slow reader), not on the upstream: no idle deadline."""
        self.read_deadline = math.inf

    async def while_sending(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The request body, counting each chunk sent as progress (long uploads)."""
        async for chunk in body:
            self.touch()
            yield chunk


class Deadlines:
    def __init__(self) -> None:
        self._live: set[Exchange] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self, read: float, total: float) -> Exchange:
        """Track the current task's exchange from now on; ``finish`` it when done."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        exchange = Exchange(loop, task, read, total)
        self._live.add(exchange)
        if self._sweeper is None:
            self._sweeper = loop.call_later(RESOLUTION, self._sweep, loop)
        return exchange

    def finish(self, exchange: Exchange) -> None:
        self._live.discard(exchange)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = None
        if not self._live:
            return  # the next start() schedules the next sweep
        now = loop.time()
        for exchange in self._live:
            if not exchange.expired and (
                now >= exchange.read_deadline or now >= exchange.total_deadline
            ):
                exchange.expired = True
                exchange.task.cancel()
        self._sweeper = loop.call_later(RESOLUTION, self._sweep, loop)
