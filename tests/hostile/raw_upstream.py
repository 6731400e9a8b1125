"""A scripted raw upstream for the hostile-upstream tests, and a gateway with metered routes
in front of it.

``ScriptedUpstream`` answers each request with the exact writes a script gives (so a test
can send garbage after a response, split it, or flood) and records what reached it: every
connection the gateway opened, the request heads on each, and whether the gateway closed
it. ``metered_gateway`` puts two routes in front of it: ``/m/fixed`` (a fixed cost of 0.25)
and ``/m/header`` (the cost the response's ``X-Usage-Cost`` header states), so a test reads
what was charged from the usage counters in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis

from gateway.store.keystore import Issued
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, ServeRaw, StartGateway

FIXED_MICRO = 250_000  # /m/fixed's cost: 0.25 credits
GOOD_BODY = b"good"
# A well-formed answer stating a cost of 0.01 credits (10 000 micro-units).
GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Usage-Cost: 0.01\r\n\r\n" + GOOD_BODY
GOOD_MICRO = 10_000

# What to write for a request: a list of writes, each written and drained on its own (a
# float instead of bytes is a pause of that many seconds; HANG waits until the gateway closes
# the connection; CLOSE closes it), or None to close the connection at once.
CLOSE = None
HANG = math.inf
Writes = Sequence[bytes | float | None] | None
# (connection number, request number on that connection, request head) -> writes
Script = Callable[[int, int, bytes], Writes]


@dataclass
class Peer:
    """One connection the gateway opened to the upstream."""

    number: int
    heads: list[bytes] = field(default_factory=list)
    written: int = 0  # bytes the upstream wrote on it
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # either side closed it


@dataclass
class ScriptedUpstream:
    script: Script
    port: int = 0
    peers: list[Peer] = field(default_factory=list)
    open: int = 0  # connections open now
    most: int = 0  # the most ever open at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[int]:
        """How many requests reached the upstream on each connection, in order opened."""
        return [len(peer.heads) for peer in self.peers]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(len(self.peers))
        self.peers.append(peer)
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                peer.heads.append(head)
                writes = self.script(peer.number, len(peer.heads) - 1, head)
                for write in [CLOSE] if writes is None else writes:
                    if write is CLOSE:
                        writer.close()  # a FIN: the end of a body without framing
                        return
                    if write == HANG:
                        await reader.read()  # until the gateway closes (or resets)
                        return
                    if isinstance(write, float):
                        await asyncio.sleep(write)
                        continue
                    writer.write(write)
                    await writer.drain()
                    peer.written += len(write)
        finally:
            self.open -= 1
            peer.closed.set()


def first_then_good(first: Writes) -> Script:
    """The first request on the first connection gets ``first``; every other one GOOD."""

    def script(connection: int, request: int, head: bytes) -> Writes:
        return first if (connection, request) == (0, 0) else [GOOD]

    return script


async def serve_scripted(serve_raw: ServeRaw, script: Script) -> ScriptedUpstream:
    upstream = ScriptedUpstream(script)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.handle(reader, writer)
        if not writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await reader.read()  # wait for the gateway to close its side

    upstream.port = await serve_raw(handler)
    return upstream


def metered_routes(upstream: str = "raw") -> list[dict[str, Any]]:
    return [
        {"name": "m-fixed", "path": "/m/fixed", "upstream": upstream, "cost": {"fixed": 0.25}},
        {
            "name": "m-header",
            "path": "/m/header",
            "upstream": upstream,
            "cost": {"header": "X-Usage-Cost"},
            "reserve": 1.0,
        },
    ]


async def metered_gateway(
    start_gateway: StartGateway, upstream: ScriptedUpstream, **upstream_options: Any
) -> Gateway:
    """A gateway whose metered routes lead to ``upstream`` through a pool of one connection
    (so that a connection wrongly kept would serve the next key's request), read timeout
    2 s and total 4 s unless ``upstream_options`` say otherwise."""
    options: dict[str, Any] = {"pool_size": 1, "timeouts": {"read": 2, "total": 4}}
    options.update(upstream_options)
    return await start_gateway(
        upstreams={"raw": {"url": upstream.url, **options}}, routes=metered_routes()
    )


class Usage:
    """A key's usage total in Redis (micro-units), as the settle script writes it."""

    def __init__(self, redis: Redis, prefix: str, key_id: str) -> None:
        self.redis, self.name = redis, f"{prefix}u:{{{key_id}}}:t"

    async def total(self) -> int:
        return int(await self.redis.get(self.name) or 0)


async def metered_key(make_key: MakeKey, redis: Redis, key_prefix: str) -> tuple[Issued, Usage]:
    issued = await make_key()
    return issued, Usage(redis, key_prefix, issued.record.id)


@dataclass
class Seen:
    """What the client saw: status, headers, body (``None`` when the body was cut short)."""

    status: int
    headers: dict[str, list[str]]
    body: bytes | None

    def all(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


async def call(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    secret: str | None,
    path: str = "/m/header",
    method: str = "GET",
) -> Seen:
    """One request; what the client saw. Waits for its settlement to reach Redis."""
    async with http.request(method, f"{gateway.url}{path}", headers=bearer(secret)) as response:
        headers: dict[str, list[str]] = {}
        for name, value in response.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        body: bytes | None
        try:
            body = await response.read()
        except aiohttp.ClientPayloadError:
            body = None
        seen = Seen(response.status, headers, body)
    await gateway.proxy.settlements.drain()
    return seen
