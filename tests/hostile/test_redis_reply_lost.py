"""A Redis reply lost after the script ran: the authorize script reserved and wrote its
ledger entry, then the connection dropped before its reply reached keygate. The client gets
503 (or, fail_open, an uncharged pass), so the reservation must not stay charged until its
lease ends (on_expiry: charge would then bill a request that was refused): the proxy
settles the entry at 0, which is a no-op if the script never ran.

The misbehaving peer is a TCP relay between keygate and Redis that, once armed, closes both
sides instead of relaying the next reply."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from gateway.store.keystore import Issued
from gateway.store.names import KeyNames
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import LOOPBACK, Gateway

pytestmark = pytest.mark.single_server  # the relay stands for one server


class ReplyCutter:
    """Relays a Redis connection byte for byte; ``arm()`` makes it drop the next reply
    (the bytes the server sends next) and close the client's connection instead."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.unix_path = parts.path if parts.scheme == "unix" else None  # the embedded server
        self.host, self.port = parts.hostname or LOOPBACK, parts.port or 6379
        self.armed = False
        self.hold = 0.0  # seconds to sit on the reply before dropping it
        self.cut = 0  # replies dropped
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, LOOPBACK, 0)
        return f"redis://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"

    def arm(self, hold: float = 0.0) -> None:
        self.armed, self.hold = True, hold

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.unix_path is not None:
            server_r, server_w = await asyncio.open_unix_connection(self.unix_path)
        else:
            server_r, server_w = await asyncio.open_connection(self.host, self.port)
        self._writers += (client_w, server_w)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if self.armed:
                    self.armed = False
                    await asyncio.sleep(self.hold)
                    self.cut += 1
                    return  # the reply is dropped; both sides are closed below
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(ConnectionError):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def cutter(redis_url: str) -> AsyncIterator[ReplyCutter]:
    relay = ReplyCutter(redis_url)
    yield relay
    await relay.close()


async def _settled(redis: object, entries: str) -> int:
    """Entries left in the key's ledger once settlements had time to land (polled)."""
    left = 0
    for _ in range(100):
        left = int(await redis.hlen(entries))  # type: ignore[attr-defined]
        if not left:
            break
        await asyncio.sleep(0.05)
    return left


async def _warm_gateway(
    start_cost_gateway: object,
    cutter: ReplyCutter,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    **redis_options: object,
) -> tuple[Gateway, Issued, str]:
    """A gateway whose Redis is behind the relay, a key, and one request through it that
    paid 0.25 (so the key's hash is cached and the script loaded); the fixed route's URL."""
    url = await cutter.start()
    gateway: Gateway = await start_cost_gateway(  # type: ignore[operator]
        redis={"url": url, **redis_options}
    )
    issued = await make_key()
    target = f"{gateway.url}/c/fixed"
    async with http.get(target, headers=bearer(issued.secret)) as first:
        assert first.status == 200
    await gateway.proxy.settlements.drain()
    return gateway, issued, target


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_a_reservation_whose_reply_was_lost_is_released_not_charged(
    start_cost_gateway: object,
    cutter: ReplyCutter,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: object,
    key_prefix: str,
    on_error: str,
) -> None:
    gateway, issued, target = await _warm_gateway(
        start_cost_gateway, cutter, make_key, http, on_error=on_error
    )
    names = KeyNames(key_prefix)
    total = names.usage(issued.record.id, "t")
    assert int(await redis.get(total)) == 250_000  # type: ignore[attr-defined]

    cutter.arm()
    async with http.get(target, headers=bearer(issued.secret)) as second:
        await second.read()
        # fail_closed: 503; fail_open: through, uncharged (the script's fate is unknown)
        assert second.status == (503 if on_error == "fail_closed" else 200)
    assert cutter.cut == 1
    await gateway.proxy.settlements.drain()

    # The script ran (it reserved 0.25 and wrote an entry); its release landed after.
    assert await _settled(redis, names.ledger_entries(issued.record.id)) == 0
    assert int(await redis.get(total)) == 250_000  # type: ignore[attr-defined]


async def test_a_lost_reply_after_the_client_left_is_released_too(
    start_cost_gateway: object,
    cutter: ReplyCutter,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: object,
    key_prefix: str,
) -> None:
    """The client leaves while the script's reply is held up, then the connection drops:
    no reply ever comes for the cancelled request, and its reservation is released."""
    gateway, issued, target = await _warm_gateway(
        start_cost_gateway, cutter, make_key, http, socket_timeout=5.0
    )
    names = KeyNames(key_prefix)
    total = names.usage(issued.record.id, "t")

    cutter.arm(hold=1.0)
    with pytest.raises(asyncio.TimeoutError):
        await http.get(
            target, headers=bearer(issued.secret), timeout=aiohttp.ClientTimeout(total=0.3)
        )
    for _ in range(100):  # the relay drops the reply 1 s after it came
        if cutter.cut:
            break
        await asyncio.sleep(0.05)
    assert cutter.cut == 1
    await asyncio.sleep(0.1)  # the connection's failure reaches the proxy
    await gateway.proxy.settlements.drain()

    assert await _settled(redis, names.ledger_entries(issued.record.id)) == 0
    assert int(await redis.get(total)) == 250_000  # type: ignore[attr-defined]
