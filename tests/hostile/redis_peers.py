"""Redis peers that misbehave without dying, for the Redis-side hostile tests.

- ``silent_server()``: a loopback TCP server that accepts every connection and never
  answers (reads and drops what it is sent): a sentinel or server that hangs.
- ``relay_to(url)``: a loopback TCP relay in front of a real Redis (a TCP or unix-socket
  server). ``Relay.black_hole()`` makes every connection open at that moment stop
  forwarding in both directions without closing, which is what a NAT or firewall that
  dropped its mapping looks like from either end: no FIN, no RST, no reply, ever.
  Connections made afterwards are relayed as usual.

Both count the connections they accepted, and stop everything they started on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"


@dataclass
class SilentServer:
    """Accepts, reads and never answers."""

    server: asyncio.Server | None = None
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return LOOPBACK, int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass  # swallowed: no reply


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    silent = SilentServer()
    silent.server = await asyncio.start_server(silent._serve, LOOPBACK, 0)
    try:
        yield silent
    finally:
        silent.server.close()
        for writer in silent.writers:
            writer.transport.abort()
        await silent.server.wait_closed()


@dataclass
class _Link:
    """One relayed connection: both sockets, and whether it has been black-holed."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    dead: bool = False


@dataclass
class Relay:
    target: tuple[str, int] | str  # host and port, or a unix socket path
    server: asyncio.Server | None = None
    connections: int = 0
    links: list[_Link] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def black_hole(self) -> None:
        """Every connection open now silently stops forwarding, both ways, and stays open."""
        for link in self.links:
            link.dead = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if isinstance(self.target, str):
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        link = _Link(writer, up_writer)
        self.links.append(link)
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer, link)),
            asyncio.create_task(_pipe(up_reader, writer, link)),
        ]
        self.tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            if link.dead:
                continue  # read and dropped: the other end hears nothing
            writer.write(data)
            await writer.drain()


def relayed_url(url: str, port: int) -> str:
    """``url`` (a single server's redis:// or unix:// URL) pointed at the relay's port,
    with its credentials and database."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{LOOPBACK}:{port}" if userinfo else f"{LOOPBACK}:{port}"
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[-1]
        return urlunsplit(("redis", netloc, f"/{db}", "", ""))
    return urlunsplit(("redis", netloc, parts.path, parts.query, ""))


@contextlib.asynccontextmanager
async def relay_to(url: str) -> AsyncIterator[Relay]:
    """A relay in front of the single server at ``url`` (redis:// or unix://)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        target: tuple[str, int] | str = parts.path
    elif parts.scheme == "redis":
        target = (parts.hostname or LOOPBACK, parts.port or 6379)
    else:
        raise ValueError(f"no relay for {parts.scheme}:// (a single plain server only)")
    relay = Relay(target)
    relay.server = await asyncio.start_server(relay._serve, LOOPBACK, 0)
    try:
        yield relay
    finally:
        relay.server.close()
        for link in relay.links:
            link.client.transport.abort()
            link.upstream.transport.abort()
        for task in list(relay.tasks):
            task.cancel()
        await asyncio.gather(*relay.tasks, return_exceptions=True)
        await relay.server.wait_closed()
