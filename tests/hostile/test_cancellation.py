"""Cancellation at awkward moments never breaks the upstream pool's accounting: a connect
cancelled at any point (the client leaving, a deadline), a waiter cancelled in the very
turn it is woken. The pool never holds more connections than ``pool_size`` (counted at a
raw upstream), and a request whose deadline passes while it waits for the pool is a 504,
never a 500.

The pool-level tests drive ``UpstreamPool`` itself (against a real loopback server), since
only there can a cancel be placed at an exact turn of the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import uvloop
from redis.asyncio import Redis

from gateway.proxy.upstream_http import UpstreamPool
from tests.conftest import MakeKey, bearer
from tests.hostile.raw_upstream import (
    GOOD,
    GOOD_BODY,
    GOOD_MICRO,
    HANG,
    Writes,
    call,
    metered_gateway,
    metered_key,
    serve_scripted,
)
from tests.proxy.conftest import LOOPBACK, ServeRaw, StartGateway


@dataclass
class Counting:
    """A raw upstream answering every request with GOOD once ``gate`` is open; it counts the
    connections open now and the most ever open at once."""

    port: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    open: int = 0
    most: int = 0
    opened: int = 0
    requests: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.opened += 1
        self.most = max(self.most, self.open)
        await self._changed()
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                await self._changed()
                await self.gate.wait()
                writer.write(GOOD)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the pool closed the connection
        finally:
            self.open -= 1
            writer.close()
            await self._changed()

    async def _changed(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def until(self, condition: Callable[[], bool], within: float = 2.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(condition)


async def serve_counting(serve_raw: ServeRaw) -> Counting:
    counting = Counting()
    counting.port = await serve_raw(counting.handle)
    return counting


@contextlib.asynccontextmanager
async def pool_to(url: str, size: int) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(url, size, connect_timeout=1.0)
    try:
        yield pool
    finally:
        await pool.close()


async def fetch(pool: UpstreamPool) -> tuple[int, bytes]:
    async with pool.request("GET", "/", []) as response:
        body = b"".join([chunk async for chunk in response.iter_any()])
        return response.status, body


async def assert_bounded(pool: UpstreamPool, upstream: Counting, size: int) -> None:
    """Twice ``size`` requests at once, held at the upstream: no more than ``size``
    connections open, then every request answered."""
    upstream.gate.clear()
    upstream.most = upstream.open
    requests = upstream.requests
    tasks = [asyncio.create_task(fetch(pool)) for _ in range(2 * size)]
    await upstream.until(lambda: upstream.requests >= requests + size)
    await asyncio.sleep(0.05)  # room for a pool that miscounts to open more
    assert upstream.most <= size, f"{upstream.most} connections open with pool_size {size}"
    upstream.gate.set()
    assert await asyncio.gather(*tasks) == [(200, GOOD_BODY)] * (2 * size)
    assert upstream.most <= size


# --- connects cancelled ----------------------------------------------------------------------


async def cancel_at_every_turn(upstream: Counting) -> None:
    """A request cancelled after 0, 1, 2 ... turns of the event loop: before connecting,
    mid-connect, in the very turn the connection is made (the transport exists, the task has
    not resumed yet), while waiting for the answer, after it. Each frees its pool slot
    exactly once: afterwards the pool still opens at most ``pool_size`` connections."""
    upstream.gate.set()
    async with pool_to(upstream.url, 2) as pool:
        for turns in range(24):
            task = asyncio.create_task(fetch(pool))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            outcome = (await asyncio.gather(task, return_exceptions=True))[0]
            assert outcome == (200, GOOD_BODY) or isinstance(outcome, asyncio.CancelledError)
        await upstream.until(lambda: upstream.open <= 2)
        await assert_bounded(pool, upstream, 2)


async def test_a_connect_cancelled_at_any_turn_frees_its_slot_once(serve_raw: ServeRaw) -> None:
    await cancel_at_every_turn(await serve_counting(serve_raw))


def test_a_connect_cancelled_at_any_turn_frees_its_slot_once_on_uvloop() -> None:
    """The same on uvloop, keygate's loop in production, whose transports differ: a
    connection made in the turn its connect is cancelled is never reported lost there."""

    async def main() -> None:
        upstream = Counting()
        server = await asyncio.start_server(upstream.handle, LOOPBACK, 0)
        upstream.port = int(server.sockets[0].getsockname()[1])
        try:
            await cancel_at_every_turn(upstream)
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(main())


async def test_clients_leaving_while_the_upstream_is_slow_to_accept_free_their_slots(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
) -> None:
    """An upstream whose accept queue is full: connecting hangs (the kernel drops the SYN).
    Clients give up after 0.1 s, cancelling the gateway's connects. Once the upstream
    accepts again, the pool (size 2) opens no more than 2 connections and answers."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    filler = socket.create_connection((LOOPBACK, port))  # fills the queue of one
    accepted: list[socket.socket] = []
    answering: set[asyncio.Task[None]] = set()
    most = 0
    serving: asyncio.Task[None] | None = None
    try:
        gateway = await start_gateway(
            upstreams={"slow": {"url": f"http://{LOOPBACK}:{port}", "pool_size": 2}},
            routes=[{"name": "slow", "prefix": "/slow", "upstream": "slow"}],
        )
        headers = bearer((await make_key()).secret)
        for _ in range(6):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await http.get(f"{gateway.url}/slow/x", headers=headers)
        filler.close()
        listener.listen(16)  # room in the queue again: connects get through at once
        loop = asyncio.get_running_loop()
        accepting = asyncio.Event()

        async def serve() -> None:
            nonlocal most
            while True:
                connection, _ = await loop.sock_accept(listener)
                accepting.set()
                accepted.append(connection)
                # The first in the queue is the filler; the rest are the gateway's.
                most = max(most, sum(c.fileno() != -1 for c in accepted[1:]))
                task = loop.create_task(answer(connection))
                answering.add(task)
                task.add_done_callback(answering.discard)

        async def answer(connection: socket.socket) -> None:
            try:
                while True:
                    data = await loop.sock_recv(connection, 65536)
                    if not data:
                        return
                    await loop.sock_sendall(connection, GOOD)
            except OSError:
                return
            finally:
                connection.close()

        serving = asyncio.create_task(serve())
        await accepting.wait()  # the filler

        async def one() -> tuple[int, bytes]:
            async with http.get(f"{gateway.url}/slow/x", headers=headers) as response:
                return response.status, await response.read()

        answers = await asyncio.gather(*(one() for _ in range(6)))
        assert answers == [(200, GOOD_BODY)] * 6
        assert most <= 2, f"{most} connections open with pool_size 2"
    finally:
        if serving is not None:
            serving.cancel()
        for task in answering:
            task.cancel()
        for connection in accepted:
            connection.close()
        filler.close()
        listener.close()


# --- waiters cancelled -------------------------------------------------------------------------


async def test_a_waiter_cancelled_in_the_turn_it_is_passed_over_leaves_the_pool_whole(
    serve_raw: ServeRaw,
) -> None:
    """Pool of one: A holds the connection, B waits for it. In one turn A finishes and B is
    cancelled (B's deadline); A's release passes over B's cancelled turn. B ends cancelled
    (no other error), and the pool goes on serving with one connection."""
    upstream = await serve_counting(serve_raw)
    upstream.gate.set()
    async with pool_to(upstream.url, 1) as pool:
        holding = asyncio.Event()
        done = asyncio.Event()

        async def a() -> None:
            async with pool.request("GET", "/", []) as response:
                holding.set()
                await done.wait()
                assert b"".join([c async for c in response.iter_any()]) == GOOD_BODY

        task_a = asyncio.create_task(a())
        await holding.wait()
        task_b = asyncio.create_task(fetch(pool))
        for _ in range(3):
            await asyncio.sleep(0)  # B is waiting for the pool now
        assert not task_b.done()
        done.set()  # A's turn comes first ...
        task_b.cancel()  # ... and B's cancel lands before B runs again
        await task_a
        outcome = (await asyncio.gather(task_b, return_exceptions=True))[0]
        assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
        assert await fetch(pool) == (200, GOOD_BODY)
        await assert_bounded(pool, upstream, 1)
        assert upstream.opened == 1  # the one connection served everything


async def test_requests_timing_out_while_waiting_for_the_pool_are_504_never_500(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
) -> None:
    """Pool of one, an upstream that never answers /m/fixed, total timeout 0.4 s:
    of 8 requests at once, one holds the connection and seven wait for it, and one deadline
    sweep cancels them all in the same turn. Every one is a 504, nothing is charged, the
    upstream never sees a second connection at once, and the next request is answered."""

    def script(connection: int, request: int, head: bytes) -> Writes:
        return [HANG] if head.startswith(b"GET /m/fixed ") else [GOOD]

    upstream = await serve_scripted(serve_raw, script)
    gateway = await metered_gateway(start_gateway, upstream, timeouts={"read": 5, "total": 0.4})
    key, usage = await metered_key(make_key, redis, key_prefix)

    async def one() -> int:
        async with http.get(f"{gateway.url}/m/fixed", headers=bearer(key.secret)) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(one() for _ in range(8)))
    assert statuses == [504] * 8
    await gateway.proxy.settlements.drain()
    assert await usage.total() == 0
    after = await call(gateway, http, key.secret)
    assert (after.status, after.body) == (200, GOOD_BODY)
    assert await usage.total() == GOOD_MICRO
    assert upstream.most == 1
