"""A lean HTTP/1.1 client for upstream exchanges: keep-alive pools, streamed both ways.

aiohttp's ClientSession was the largest share of the proxy's CPU per request (timeout
handles, cookie and redirect machinery, tracing hooks, auto headers, a StreamReader per
response): more than the whole rest of keygate. A proxy needs far less of it: write the
request head it already has, stream the body, parse the answer (llhttp, via httptools) and
hand the chunks on. This module does that and nothing more; WebSocket routes still use
aiohttp (gateway/proxy/websocket.py).

An upstream is trusted no further than HTTP frames its answer: the head is frozen once
parsed, a byte after a whole answer closes the connection (it is never pooled, so nothing
an upstream sends can reach another request), and a head over its caps, a status outside
100..599, a 101 or a transfer coding other than chunked is refused (502) before anything is
relayed. Each connection's progress is one ``State``, changed in one place.

Idle-read and total deadlines are gateway/proxy/deadlines.py's (they cancel the request's
task); here only connecting is bounded in time, and answers in size.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import enum
import ssl
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import ClassVar, Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HIGH_WATER: Final = 256 * 1024  # response bytes buffered before reading from upstream pauses
# Caps on an answer's head (status line to blank line, interim 1xx answers included), like a
# public edge proxy's: Envoy refuses response heads over 60 KiB (max_response_headers_kb)
# or 100 fields (max_headers_count); nginx fails an upstream head larger than its
# proxy_buffer_size (4-8 KiB) with 502. Real API answers carry 1-2 KiB in 10-30 fields, and
# cookie- or token-heavy ones stay well under 16 KiB: 64 KiB and Envoy's 100 fields leave
# room for those while bounding what one answer can hold (100 connections: 6.4 MiB at most).
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_HEADER_FIELDS: Final = 100
IDLE_TIMEOUT: Final = 15.0  # seconds an idle keep-alive connection is trusted (aiohttp's)
# RFC 9110 §9.2.2: a request the upstream may receive twice; only these are re-sent when a
# reused connection turns out to have been closed before any answer.
IDEMPOTENT: Final = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
_BODY_METHODS: Final = frozenset(("POST", "PUT", "PATCH"))

Body = bytes | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """The exchange with the upstream failed; the message is safe to log (no addresses), and
    ``detail`` is what the client may be told."""

    detail: ClassVar[str] = "the upstream could not be reached"


class UpstreamUnreachable(UpstreamError):
    """No connection could be made (refused, unresolvable, TLS failure)."""


class UpstreamClosed(UpstreamError, ConnectionResetError):
    """The connection closed or reset before the answer was complete."""

    detail = "the upstream closed the connection"


class UpstreamInvalid(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1 (or not one a proxy may relay)."""

    detail = "the upstream's answer was not valid HTTP"


class UpstreamHeadTooLarge(UpstreamInvalid):
    """The answer's head is larger than the pool accepts (bytes or header fields)."""

    detail = "the upstream's response headers were larger than the gateway accepts"


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp at once; ``state`` already tells why."""


class State(enum.IntEnum):
    """Where a connection is. Every change goes through ``_Connection._move``.

    There is no state for sending: the request head is written as the exchange begins and
    its body streams concurrently with the answer (an early 413 is read while uploading),
    so the answer's progress is the connection's state; the upload is the exchange's task.
    (An IntEnum: hashed as an int, a table lookup per change stays cheap.)
    """

    CONNECTING = 0  # no transport yet: the pool slot is still acquire()'s
    IDLE = 1  # open, between exchanges: any byte from the upstream is a violation
    HEAD = 2  # an exchange is under way: waiting for / reading the answer's head
    BODY = 3  # the final head is parsed (and frozen); its body is arriving
    DONE = 4  # the answer is whole and the connection clean: it may serve another
    LAST = 5  # the answer is whole, and was this connection's last (closing)
    BROKEN = 6  # the exchange failed or the connection is unusable (closing); see ``error``
    CLOSED = 7  # gone, its pool slot freed; the answer's outcome stays (``error``)


_CONNECTING, _IDLE, _HEAD, _BODY, _DONE, _LAST, _BROKEN, _CLOSED = State
_NEXT: Final[dict[State, frozenset[State]]] = {
    _CONNECTING: frozenset((_IDLE,)),
    _IDLE: frozenset((_HEAD, _BROKEN)),
    _HEAD: frozenset((_BODY, _LAST, _BROKEN)),
    _BODY: frozenset((_DONE, _LAST, _BROKEN)),
    _DONE: frozenset((_IDLE, _LAST)),
    _LAST: frozenset((_CLOSED,)),
    _BROKEN: frozenset((_CLOSED,)),
    _CLOSED: frozenset(),
}


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one exchange at a time, its answer parsed as it comes.

    The answer's head (status, reason, headers) is frozen when llhttp finishes parsing it;
    nothing parsed later can change what the exchange's reader sees. Bytes after a complete
    answer (a second answer nobody asked for, garbage) are a violation: the answer already
    whole is still delivered, but the connection is closed, never pooled. (llhttp skips CR
    and LF before a start line, so a stray empty line right after an answer goes unseen; it
    cannot begin or forge an answer.)

    What the upstream can make the gateway hold is bounded: the head by ``max_head_bytes``
    (interim answers included) and ``max_header_fields``; in a chunked body, the bytes that
    are not body (chunk sizes and extensions, trailer fields, which are dropped) by
    ``max_head_bytes`` between two body bytes; the body itself by ``HIGH_WATER`` (reading
    pauses until the reader catches up).
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._max_head = pool.max_head_bytes
        self._max_fields = pool.max_header_fields
        self.state = _CONNECTING
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._can_write: asyncio.Future[None] | None = None  # set while writing is paused
        self.chunks: collections.deque[bytes] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._paused = False  # reading paused: the reader is HIGH_WATER behind
        # Of the exchange under way (``begin`` and the parser callbacks set them):
        self._head_request = False  # a HEAD request: its answer has no body whatever it says
        self._head_left = 0  # bytes the answer's head (interim answers included) may still take
        self._not_body = 0  # bytes received in BODY since the last body byte (framing)
        self._trailers = 0  # trailer fields of the chunked body being parsed
        self._reason = b""
        self._fields: list[tuple[str, str]] = []
        self.status = 0  # the final head, frozen at on_headers_complete
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.header_ready: asyncio.Future[None] = self._loop.create_future()
        self.buffered = 0  # body bytes in ``chunks``
        self.error: UpstreamError | None = None  # why the exchange failed (BROKEN)

    # --- states ------------------------------------------------------------------------------

    def _move(self, to: State, error: UpstreamError | None = None) -> None:
        """The one place the state changes, with what each change means.

        Entering BODY, DONE or LAST hands the head over (``header_ready``); entering LAST or
        BROKEN closes the transport (the connection never serves again) and BROKEN records
        ``error``; any of them wakes a reader waiting for body bytes. Entering CLOSED (once:
        it has no way out) frees the connection's pool slot."""
        if to not in _NEXT[self.state]:
            raise RuntimeError(f"upstream connection: no move from {self.state!r} to {to!r}")
        self.state = to
        if to <= _HEAD:  # IDLE, HEAD: nobody waits on these
            return
        ready = self.header_ready
        if to is _BROKEN:
            if error is None:
                error = UpstreamClosed("the connection was closed")
            self.error = error
            if not ready.done():
                ready.set_exception(error)
                ready.exception()  # retrieved: nobody may be waiting any more
        elif not ready.done():
            ready.set_result(None)
        if to >= _LAST:
            transport, self.transport = self.transport, None
            if transport is not None:
                transport.abort()  # connection_lost follows: CLOSED
            if to is _CLOSED:
                self._pool._forget(self)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def begin(self, *, head_request: bool) -> None:
        """An exchange starts on this connection; ``head_request``: HEAD. Raises when the
        connection broke while idle (closed, or the upstream spoke unasked) since the pool
        handed it out."""
        if self.state is not _IDLE:
            raise self.error or UpstreamClosed("the upstream closed the connection")
        self._head_request = head_request
        self._head_left = self._max_head
        self.header_ready = self._loop.create_future()
        self.buffered = 0
        self.error = None
        self._move(_HEAD)

    def rest(self) -> None:
        """The exchange is over and its answer was whole: back to the pool."""
        self.idle_since = time.monotonic()
        self._move(_IDLE)

    def discard(self) -> None:
        """Never use this connection again (closing now)."""
        state = self.state
        if state is _DONE:
            self._move(_LAST)
        elif state <= _BODY:
            self._move(_BROKEN)

    def close_now(self) -> None:
        """Discard the connection and free its pool slot now, without waiting for
        connection_lost. For a connection made in the very turn its connect was cancelled:
        asyncio reports it lost later (ignored then), uvloop never does."""
        self.discard()
        if self.state is not _CLOSED:
            self._move(_CLOSED)

    @property
    def received(self) -> bool:
        """Whether any byte of the current exchange's answer arrived."""
        return self._head_left < self._max_head

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._move(_IDLE)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _BODY:
            self._not_body += len(data)  # on_body resets it
        elif state is _HEAD:
            left = self._head_left
            if len(data) > left:
                self._head_crossing(data, left)
                return
            self._head_left = left - len(data)
        else:
            self._unasked()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._invalid(exc)
            return
        if self._not_body > self._max_head and self.state is _BODY:
            message = f"the upstream sent over {self._max_head} bytes of chunk framing or trailers"
            self._move(_BROKEN, UpstreamHeadTooLarge(message))

    def _head_crossing(self, data: bytes, left: int) -> None:
        """``data`` holds more than the head may still take: parse up to the cap, and the
        rest only if the head ended within it."""
        self._head_left = 0
        view = memoryview(data)
        try:
            self._parser.feed_data(view[:left])
            if self.state is _HEAD:
                message = f"the upstream's response head is over {self._max_head} bytes"
                self._move(_BROKEN, UpstreamHeadTooLarge(message))
            elif self.state is _BODY:
                self._parser.feed_data(view[left:])
            elif self.state is _DONE:
                self._unasked()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._invalid(exc)

    def _invalid(self, exc: Exception) -> None:
        """llhttp stopped: a callback said why (and moved the state), or the answer is not
        HTTP."""
        if self.state is _HEAD or self.state is _BODY:
            if isinstance(exc, httptools.HttpParserUpgrade):
                message = "the upstream switched protocols on a plain request"
            else:
                message = f"the upstream's answer is not valid HTTP: {exc}"
            self._move(_BROKEN, UpstreamInvalid(message))

    def _unasked(self) -> None:
        """Bytes nobody asked for: after a whole answer, or between exchanges."""
        state = self.state
        if state is _DONE:
            self._move(_LAST)  # the answer stands; the connection cannot be trusted
        elif state is _IDLE:
            self._move(_BROKEN, UpstreamInvalid("the upstream sent bytes with no request open"))
        # LAST, BROKEN: closed already; what was in flight does not matter

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_exception(UpstreamClosed("the upstream closed the connection"))
            self._can_write.exception()  # retrieved: the writer may be gone
        state = self.state
        if state is _CLOSED:
            return  # closed and its slot freed already (close_now)
        if state is _BODY and self._ends_at_close():
            self._move(_LAST)  # an answer without framing ends when the connection does
        elif state is _DONE:
            self._move(_LAST)
        elif state <= _BODY:
            self._move(_BROKEN, UpstreamClosed("the upstream closed the connection"))
        self._move(_CLOSED)

    def _ends_at_close(self) -> bool:
        """The answer has neither Content-Length nor Transfer-Encoding: its body ends where
        the connection does (HTTP/1.0 style)."""
        headers = self.headers
        return "Content-Length" not in headers and "Transfer-Encoding" not in headers

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # --- httptools callbacks: any of them may raise _Stop after moving the state --------------

    def on_message_begin(self) -> None:
        if self.state is not _HEAD:  # a second answer to one request
            self._unasked()
            raise _Stop
        self._reason = b""  # a final answer after interim ones: only its own head counts
        self._fields = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        """A field of the head; or in BODY a trailer field: counted, then dropped."""
        state = self.state
        if state is _HEAD:
            fields = self._fields
            if len(fields) >= self._max_fields:
                self._too_many_fields()
            # llhttp drops the whitespace before a value, not after it; neither is part of it
            # (RFC 9110 §5.5). rstrip returns the same object when there is nothing to strip.
            value = value.rstrip(b" \t")
            fields.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))
        elif state is _BODY:
            self._trailers += 1
            if self._trailers > self._max_fields:
                self._too_many_fields()
        # LAST: what follows a HEAD answer

    def _too_many_fields(self) -> None:
        message = f"the upstream's response has more than {self._max_fields} header fields"
        self._move(_BROKEN, UpstreamHeadTooLarge(message))
        raise _Stop

    def on_headers_complete(self) -> None:
        if self.state is not _HEAD:
            raise _Stop
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self._violation("the upstream switched protocols on a plain request")
            if status < 100:
                self._violation(f"the upstream's status {status:03d} is not in 100..599")
            return  # interim (100 Continue, 103 Early Hints): the answer follows
        if status > 599:
            self._violation(f"the upstream's status {status} is not in 100..599")
        headers = CIMultiDictProxy(CIMultiDict(self._fields))
        if "Transfer-Encoding" in headers and not _only_chunked(headers):
            # Only chunked is undone here; any other coding would reach the client unnamed.
            self._violation("the upstream's answer has a transfer coding other than chunked")
        self.status = status
        self.reason = self._reason.decode("latin-1")
        self.headers = headers
        self._trailers = 0
        self._not_body = 0
        # A HEAD answer has no body; llhttp would wait for the one Content-Length announces
        # and its parser state is unknown after: the connection's last answer.
        self._move(_LAST if self._head_request else _BODY)

    def _violation(self, message: str) -> None:
        self._move(_BROKEN, UpstreamInvalid(message))
        raise _Stop

    def on_body(self, body: bytes) -> None:
        if self.state is not _BODY:
            return  # the body of a HEAD answer: ignored
        self._not_body = 0
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self.state is _BODY:
            self._move(_DONE if self._parser.should_keep_alive() else _LAST)
        # HEAD: an interim answer ended; the real one follows. LAST: a HEAD answer's body.

    # --- the exchange ----------------------------------------------------------------------

    def send_now(self, data: bytes) -> None:
        if self.transport is None:
            raise UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)

    async def write(self, data: bytes) -> None:
        """Send, then wait while the transport's buffer is over its high-water mark."""
        if self.transport is None:
            raise UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)
        if self._can_write is not None and not self._can_write.done():
            await self._can_write

    async def next_chunk(self) -> bytes | None:
        """The body bytes received since the last call, waiting for some; None at the end
        (the answer is whole); raises the exchange's error when it broke first."""
        while not self.chunks:
            if self.state is not _BODY:  # DONE, LAST; BROKEN; CLOSED after either
                if self.error is not None:
                    raise self.error
                return None
            self._wake = self._loop.create_future()
            await self._wake
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _wake_reader(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)


_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())


def _only_chunked(headers: CIMultiDictProxy[str]) -> bool:
    """Every Transfer-Encoding field names chunked alone."""
    return all(
        value.strip(" \t").lower() == "chunked" for value in headers.getall("Transfer-Encoding")
    )


class UpstreamResponse:
    """An answer being received: status, reason and headers now, the body as it comes."""

    __slots__ = ("_connection", "headers", "reason", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = connection.status  # frozen when the head was parsed
        self.reason = connection.reason
        self.headers = connection.headers

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
            try:
                connection.begin(head_request=self._method == "HEAD")
                if isinstance(body, bytes):
                    # In memory already: handed to the transport whole, without waiting for
                    # it to drain, so an early answer (413) is read rather than raced.
                    connection.send_now(head + body)
                else:
                    connection.send_now(head)
                    if body is not None:
                        self._sending = asyncio.ensure_future(self._send(connection, body))
                await connection.header_ready
                if connection.error is not None:
                    # Broken before anything was relayed (in the read that carried the head):
                    # a 502 is better than a truncated answer.
                    raise connection.error
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
            and connection.state is _DONE
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
            connection.discard()  # the client's upload broke: the upstream must not wait on


async def _chunked(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in body:
        if chunk:
            yield b"%x\r\n%b\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"


class UpstreamPool:
    """Keep-alive connections to one upstream, at most ``size`` at a time (aiohttp's
    connector ``limit``); callers beyond it wait for one to be released.

    ``max_head_bytes`` and ``max_header_fields`` bound each answer's head: over either, the
    answer is refused (UpstreamHeadTooLarge) before anything of it is relayed."""

    def __init__(
        self,
        url: str,
        size: int,
        connect_timeout: float,
        *,
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_header_fields: int = MAX_HEADER_FIELDS,
    ) -> None:
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
        self.max_head_bytes = max_head_bytes
        self.max_header_fields = max_header_fields
        self._idle: list[_Connection] = []
        # Slots taken: connections open (idle included; each frees its slot in
        # connection_lost) plus connects under way (freed by acquire() if they fail before
        # a connection is made).
        self._count = 0
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
                if connection.state is _IDLE and now - connection.idle_since < IDLE_TIMEOUT:
                    return connection, True
                connection.discard()
            if self._count < self.size:
                self._count += 1
                connection = _Connection(self)
                try:
                    await self._connect(connection)
                except BaseException:
                    if connection.state is _CONNECTING:
                        self._count -= 1  # no connection was made: the slot is still ours
                        self._wake_one()
                    else:
                        # Made, then cancelled in the same turn (the client left, a deadline):
                        # the connection holds the slot; it frees it now, once.
                        connection.close_now()
                    raise
                return connection, False
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: pass the turn on
                else:
                    # Cancelled while waiting; a release may have passed over it already.
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise

    async def _connect(self, connection: _Connection) -> None:
        loop = self.loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: connection,
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

    def release(self, connection: _Connection, *, reuse: bool) -> None:
        if reuse and connection.state is _DONE and not self._closed:
            connection.rest()
            self._idle.append(connection)
        else:
            connection.discard()  # connection_lost calls _forget
        self._wake_one()

    def _forget(self, connection: _Connection) -> None:
        """A connection closed (it entered CLOSED, which it does once): its slot is free."""
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
            connection.discard()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports report they are gone
