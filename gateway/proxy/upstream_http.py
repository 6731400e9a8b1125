"""A lean HTTP/1.1 client for upstream exchanges: keep-alive pools, streamed both ways.

aiohttp's ClientSession was the largest share of the proxy's CPU per request (timeout
handles, cookie and redirect machinery, tracing hooks, auto headers, a StreamReader per
response): more than the whole rest of keygate. A proxy needs far less of it: write the
request head it already has, stream the body, parse the answer (llhttp, via httptools) and
hand the chunks on. This module does that and nothing more; WebSocket routes still use
aiohttp (gateway/proxy/websocket.py).

Idle-read and total deadlines are gateway/proxy/deadlines.py's (they cancel the request's
task); only connecting is bounded here.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HIGH_WATER: Final = 256 * 1024  # response bytes buffered before reading from upstream pauses
IDLE_TIMEOUT: Final = 15.0  # seconds an idle keep-alive connection is trusted (aiohttp's)
# RFC 9110 §9.2.2: a request the upstream may receive twice; only these are re-sent when a
# reused connection turns out to have been closed before any answer.
IDEMPOTENT: Final = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
_BODY_METHODS: Final = frozenset(("POST", "PUT", "PATCH"))

Body = bytes | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """The exchange with the upstream failed; the message is safe to log (no addresses)."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made (refused, unresolvable, TLS failure)."""


class UpstreamClosed(UpstreamError, ConnectionResetError):
    """The connection closed or reset before the answer was complete."""


class UpstreamInvalid(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one exchange at a time, its answer parsed as it comes."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # holds one of the pool's slots until it closes
        self.busy = False  # an exchange is under way (bytes while idle are a broken peer)
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._can_write: asyncio.Future[None] | None = None  # set while writing is paused
        self._reset(head=False)

    def _reset(self, *, head: bool) -> None:
        """Ready for the next exchange (``head``: its answer has no body whatever it says)."""
        self.busy = True
        self.head = head
        self.received = False  # any byte of the answer
        self.status = 0
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self.header_ready: asyncio.Future[None] = self._loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self._wake: asyncio.Future[None] | None = None
        self._paused = False

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.abort()  # an answer nobody asked for: the connection cannot be trusted
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamInvalid("the upstream switched protocols on a plain request"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamInvalid(f"the upstream's answer is not valid HTTP: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if (
            not self.complete
            and self.error is None
            and self.header_ready.done()
            and self._unframed()
        ):
            self.complete = True  # an answer without framing ends when the connection does
            self._wake_reader()
        elif not self.complete:
            self._fail(UpstreamClosed("the upstream closed the connection"))
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_exception(UpstreamClosed("the upstream closed the connection"))
            self._can_write.exception()  # retrieved: the writer may be gone
        self._pool._forget(self)

    def _unframed(self) -> bool:
        """The answer has neither Content-Length nor Transfer-Encoding: its body ends where
        the connection does (HTTP/1.0 style)."""
        return not any(
            name.lower() in ("content-length", "transfer-encoding") for name, _ in self._headers
        )

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reason = b""
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # interim (100 Continue, 103 Early Hints): the answer follows
        self.status = status
        if self.head:  # llhttp would wait for the body Content-Length announces
            self.complete = True
            self.keep_alive = False  # and its parser state is unknown: never reused
        self.header_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.head or not self.header_ready.done():
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if not self.header_ready.done():
            return  # an interim answer ended; the real one follows
        if not self.head:
            self.complete = True
            self.keep_alive = self._parser.should_keep_alive()
        self._wake_reader()

    # --- the exchange ----------------------------------------------------------------------

    def reason(self) -> str:
        return self._reason.decode("latin-1")

    def headers(self) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict(self._headers))

    def send_now(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)

    async def write(self, data: bytes) -> None:
        """Send, then wait while the transport's buffer is over its high-water mark."""
        if self.closed or self.transport is None:
            raise UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)
        if self._can_write is not None and not self._can_write.done():
            await self._can_write

    async def next_chunk(self) -> bytes | None:
        """The body bytes received since the last call, waiting for some; None at the end."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self._wake = self._loop.create_future()
            await self._wake
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _wake_reader(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.header_ready.done():
            self.header_ready.set_exception(error)
            self.header_ready.exception()  # retrieved: nobody may be waiting any more
        self._wake_reader()
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class UpstreamResponse:
    """An answer being received: status, reason and headers now, the body as it comes."""

    __slots__ = ("_connection", "headers", "reason", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = connection.status
        self.reason = connection.reason()
        self.headers = connection.headers()

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (what is buffered, joined); raises UpstreamClosed when
        the connection ends before the body does."""
        next_chunk = self._connection.next_chunk
        while (chunk := await next_chunk()) is not None:
            yield chunk


class _Exchange:
    """``async with pool.request(...) as response``: the connection goes back to the pool
    only when the answer was read whole and both sides keep it alive; otherwise it closes."""

    def __init__(
        self,
        pool: UpstreamPool,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> None:
        self._pool = pool
        self._method = method
        self._target = target
        self._headers = headers
        self._body = body
        self._connection: _Connection | None = None
        self._sending: asyncio.Task[None] | None = None

    async def __aenter__(self) -> UpstreamResponse:
        pool = self._pool
        head = self._head()
        body = self._body
        replayable = not isinstance(body, AsyncIterator) and self._method in IDEMPOTENT
        while True:
            connection, reused = await pool.acquire()
            self._connection = connection
            connection._reset(head=self._method == "HEAD")
            try:
                if isinstance(body, bytes):
                    # In memory already: handed to the transport whole, without waiting for
                    # it to drain, so an early answer (413) is read rather than raced.
                    connection.send_now(head + body)
                else:
                    connection.send_now(head)
                    if body is not None:
                        self._sending = asyncio.ensure_future(self._send(connection, body))
                await connection.header_ready
            except UpstreamClosed:
                if reused and replayable and not connection.received:
                    # The upstream closed this idle connection as it was taken (its own
                    # keep-alive timeout): it never saw the request, so send it afresh.
                    self._release(reuse=False)
                    continue
                self._release(reuse=False)
                raise
            except BaseException:
                self._release(reuse=False)
                raise
            return UpstreamResponse(connection)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        connection = self._connection
        sent = self._sending is None or (
            self._sending.done()
            and not self._sending.cancelled()
            and self._sending.exception() is None
        )
        reuse = (
            kind is None
            and connection is not None
            and connection.complete
            and connection.keep_alive
            and sent
            and not connection.chunks
        )
        self._release(reuse=reuse)

    def _release(self, *, reuse: bool) -> None:
        if self._sending is not None and not self._sending.done():
            self._sending.cancel()
        self._sending = None
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection, reuse=reuse)

    def _head(self) -> bytes:
        pool = self._pool
        lines = [f"{self._method} {self._target} HTTP/1.1\r\nHost: {pool.host_header}\r\n"]
        has_length = False
        headers = self._headers
        if pool.credentials and not any(n.lower() == "authorization" for n, _ in headers):
            headers = [*headers, *pool.credentials]
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
            if not has_length and name.lower() == "content-length":
                has_length = True
        body = self._body
        if isinstance(body, bytes):
            if not has_length:
                lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            if not has_length:
                lines.append("Transfer-Encoding: chunked\r\n")
                self._body = _chunked(body)
        elif self._method in _BODY_METHODS and not has_length:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    @staticmethod
    async def _send(connection: _Connection, body: AsyncIterator[bytes]) -> None:
        """The request body, streamed while the answer may already be arriving."""
        try:
            async for chunk in body:
                await connection.write(chunk)
        except UpstreamClosed:
            return  # the answer (or its absence) tells the rest
        except Exception:
            connection.abort()  # the client's upload broke: the upstream must not wait on


async def _chunked(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in body:
        if chunk:
            yield b"%x\r\n%b\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"


class UpstreamPool:
    """Keep-alive connections to one upstream, at most ``size`` at a time (aiohttp's
    connector ``limit``); callers beyond it wait for one to be released."""

    def __init__(self, url: str, size: int, connect_timeout: float) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"upstream URL must be http:// or https://: {url!r}")
        self.host = parsed.host
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        host = parsed.raw_host or self.host
        self.host_header = f"[{host}]" if ":" in host else host  # an IPv6 literal
        if parsed.explicit_port:
            self.host_header += f":{parsed.port}"
        self.base_path = parsed.raw_path.rstrip("/")  # the upstream URL's own path
        self.credentials: tuple[tuple[str, str], ...] = ()
        if parsed.user is not None:  # http://user:password@host: Basic auth, as aiohttp did
            token = base64.b64encode(f"{parsed.user}:{parsed.password or ''}".encode())
            self.credentials = (("Authorization", f"Basic {token.decode()}"),)
        self.tls: ssl.SSLContext | None = (
            ssl.create_default_context() if parsed.scheme == "https" else None
        )
        self.size = size
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._count = 0  # open or opening, idle included
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: Body = None
    ) -> _Exchange:
        """``target``: the path and query, already encoded."""
        return _Exchange(self, method, target, headers, body)

    async def acquire(self) -> tuple[_Connection, bool]:
        """A connection for one exchange, and whether it served one before."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise UpstreamUnreachable("the upstream pool is closed")
            now = time.monotonic()
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed and now - connection.idle_since < IDLE_TIMEOUT:
                    return connection, True
                connection.abort()
            if self._count < self.size:
                self._count += 1
                try:
                    return await self._connect(), False
                except BaseException:
                    self._count -= 1
                    self._wake_one()
                    raise
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on
                else:
                    self._waiters.remove(waiter)
                raise

    async def _connect(self) -> _Connection:
        loop = self.loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:  # an OSError too, but the caller answers it with 504, not 502
            raise
        except OSError as exc:
            raise UpstreamUnreachable(
                f"cannot connect to the upstream: {type(exc).__name__}"
            ) from None
        return connection

    def release(self, connection: _Connection, *, reuse: bool) -> None:
        connection.busy = False
        if reuse and not connection.closed and not self._closed:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.abort()  # connection_lost calls _forget
        self._wake_one()

    def _forget(self, connection: _Connection) -> None:
        """A connection closed (by either side): its slot is free."""
        if not connection.counted:
            return
        connection.counted = False
        if connection in self._idle:
            self._idle.remove(connection)
        self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every idle connection; busy ones close as their exchanges end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.abort()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports report they are gone
