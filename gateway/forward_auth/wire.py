"""The auth listener's HTTP/1.1 server: a raw asyncio protocol over llhttp (httptools).

A check request is small, bodiless as a rule, and answered from its head plus one Redis
call; aiohttp's server machinery (a request handler loop, a response object prepared and
written in steps) cost more per check than the check itself, and held nginx with
``auth_request`` to a third of the requests/s it reaches against a free authorizer
(docs/benchmarks.md). Here a connection parses with llhttp, hands each complete request to
``ForwardAuth.handle`` as an aiohttp ``BaseRequest`` (so the proxy's chain runs unchanged),
and writes the answer in one ``write``.

The limits are the other listeners' (gateway/listener.py), applied the same way:

- a connection beyond the listener's cap is closed at once;
- a request head must be complete within ``client.header_timeout`` of the connection's
  opening or of its first byte after an idle spell; an idle connection closes after
  ``client.keepalive_timeout``; neither is answered;
- a body must bring ``body_timeout * min_upload_rate`` bytes (and one) every
  ``client.body_timeout`` seconds, else 408 and the connection closes; a body over
  ``MAX_BODY`` bytes is 413 as soon as it is announced or passes that size;
- a malformed head gets a fixed RFC 9457 problem (400, 414 or 431) that echoes nothing of
  the request, and the connection closes;
- requests sent back to back (pipelined) are answered in order, one at a time;
- a client that leaves cancels its request's handler, as on the proxy listener;
- an Upgrade request is answered like any check (never a 101), then the connection closes.

One timer per connection, re-armed only when a deadline comes sooner than the armed one
(a head or a body arriving in pieces): a check whose head comes in one packet, as a
proxy sends it, costs no timer operation.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import Final, cast

import httptools
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.forward_auth.service import Allowed, Answer, ForwardAuth
from gateway.listener import (
    REQUEST_TIMEOUT,
    ListenerGuard,
    connection_budget,
    error_frames,
    fixed_problem,
    parser_detail,
)
from gateway.proxy.live import LiveProxy
from gateway.proxy.llm import MAX_LLM_BODY
from gateway.sockets import BACKLOG

log = logging.getLogger("keygate.client")

MAX_TARGET: Final = 8190  # bytes of a request target (aiohttp's limit on other listeners)
MAX_FIELD: Final = 8190  # bytes of a header name or value
MAX_FIELDS: Final = 128  # header fields in one head
MAX_HEAD: Final = 65_536  # bytes of a head still incomplete: past this it is refused
MAX_BODY: Final = MAX_LLM_BODY  # the largest body any check or report reads
MAX_QUEUED: Final = 8  # complete requests held behind the one being answered
LINGER: Final = 2.0  # seconds a refused client's bytes are discarded before closing
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS: Final = {"1.1": HttpVersion11, "1.0": HttpVersion10}

# Headers an answer's own framing sets; a handler's copies are dropped.
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection", "date"))


class _Refused(Exception):
    """A request the parser must not go on with: the fixed answer, then close."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.answer = fixed_problem(status, code, detail)


class _Request:
    """One parsed request, waiting its turn."""

    __slots__ = (
        "body",
        "chunked",
        "head_only",
        "keep_alive",
        "method",
        "raw_headers",
        "target",
        "version",
    )

    def __init__(
        self,
        method: str,
        target: str,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        chunked: bool,
        version: HttpVersion,
    ) -> None:
        self.method = method
        self.target = target
        self.raw_headers = raw_headers
        self.body = body
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.version = version
        self.head_only = method == "HEAD"


class _Incoming:
    """A parsed request as ``ForwardAuth`` reads it (its ``Incoming``)."""

    __slots__ = ("_connection", "_request", "headers", "method", "raw_path")

    def __init__(self, connection: AuthConnection, request: _Request) -> None:
        self._connection = connection
        self._request = request
        self.method = request.method
        self.raw_path = request.target
        self.headers = CIMultiDictProxy(
            CIMultiDict(
                [
                    (
                        name.decode("utf-8", "surrogateescape"),
                        value.decode("utf-8", "surrogateescape"),
                    )
                    for name, value in request.raw_headers
                ]
            )
        )

    def as_aiohttp(self, method: str, target: str) -> web.BaseRequest:
        return self._connection.as_aiohttp(self._request, self.headers, method, target)


class _Clock:
    """The Date header's text, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def date(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._text = email.utils.formatdate(second, usegmt=True)
        return self._text


_CLOCK = _Clock()


def encode(response: Answer, *, head_only: bool, close: bool) -> bytes:
    """A handler's answer as HTTP/1.1 bytes: its status, headers and body, framed with
    Content-Length (and ``Connection: close`` when the connection ends after it)."""
    if isinstance(response, Allowed):  # the common answer, and bodiless: the short way
        fields = "".join([f"{name}: {value}\r\n" for name, value in response.headers.items()])
        lines = len(response.headers)
        if fields.count("\n") != lines or fields.count("\r") != lines:
            raise ValueError("a header of the answer holds a line break")
        ending = "Connection: close\r\n\r\n" if close else "\r\n"
        return (
            f"HTTP/1.1 200 OK\r\n{fields}Content-Length: 0\r\nDate: {_CLOCK.date()}\r\n{ending}"
        ).encode()
    body = response.body if isinstance(response, web.Response) else None
    if body is None:
        payload = b""
    elif isinstance(body, bytes | bytearray):
        payload = bytes(body)
    else:  # a streamed payload: no handler of this listener makes one
        raise TypeError("the auth listener answers with bytes bodies only")
    parts = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
    typed = False
    for name, value in response.headers.items():
        lowered = name.lower()
        if lowered in _FRAMING:
            continue
        if "\n" in value or "\r" in value:  # never split a header into two
            raise ValueError(f"header {name} holds a line break")
        typed = typed or lowered == "content-type"
        parts.append(f"{name}: {value}\r\n")
    if payload and not typed:
        parts.append("Content-Type: application/octet-stream\r\n")
    parts.append(f"Content-Length: {len(payload)}\r\nDate: {_CLOCK.date()}\r\n")
    if close:
        parts.append("Connection: close\r\n")
    parts.append("\r\n")
    head = "".join(parts).encode()
    return head if head_only else head + payload


class AuthConnection(asyncio.Protocol):
    """One caller connection (see the module docstring for its limits)."""

    def __init__(self, listener: AuthListener) -> None:
        self._listener = listener
        self._guard = listener.guard
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._admitted = False
        # The request being parsed.
        self._target: list[bytes] = []
        self._target_size = 0
        self._headers: list[tuple[bytes, bytes]] = []  # as received
        self._chunked = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._expects_continue = False
        # Where the parser is: "head" (a head began or is due), "body", or "idle".
        self._phase = "head"
        self._head_start = self._loop.time()
        self._head_bytes = 0
        self._idle_since = 0.0
        self._window_start = 0.0
        self._window_bytes = 0
        self._continue_held = False  # the body waits for our 100 Continue
        self._queue: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last: bytes | None = None  # a fixed answer, then close, once the queue is out
        self._close_after_queue = False  # an Upgrade: answer what is queued, then close
        self._paused = False
        self.peername: object = None
        self.sockname: object = None
        self.ssl_context = None

    # --- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        if not self._guard.admit():
            transport.abort()
            return
        self._admitted = True
        self._transport = transport
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self._listener.connections.add(self)
        self._arm(self._head_start + self._guard.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._guard.release()
        self._listener.connections.discard(self)
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the caller left: its check has no one to answer
        self._queue.clear()

    @property
    def busy(self) -> bool:
        """A request is being answered or waits its turn."""
        return self._task is not None or bool(self._queue)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # What aiohttp's StreamReader calls on its protocol for flow control: a body here is
    # whole in memory before its request is answered, so there is nothing to hold back.
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass

    # --- reading -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._last is not None or self._close_after_queue:
            return  # the connection ends after what is queued: nothing more is parsed
        if self._phase == "body":
            self._continue_held = False  # the client sends: it waits for nothing now
        try:
            self._parser.feed_data(data)
        except _Refused as refused:
            self._refuse(refused.answer)
            return
        except httptools.HttpParserUpgrade:
            self._close_after_queue = True  # answered like any check; the rest is not HTTP
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            if isinstance(context, _Refused):
                self._refuse(context.answer)
                return
            raise
        except httptools.HttpParserError as exc:
            self._refuse(_malformed(exc, first_bytes=data))
            return
        if self._phase == "head":
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                detail = f"the request head is longer than {MAX_HEAD} bytes"
                self._refuse(fixed_problem(431, "headers_too_large", detail))
                return
            if self._head_bytes:  # a head arriving in pieces: its clock is armed
                self._arm(self._head_start + self._guard.header_timeout)
        elif self._phase == "body":
            self._arm(self._window_start + self._guard.body_timeout)
        self._next()

    # llhttp's callbacks, in the order it calls them.

    def on_message_begin(self) -> None:
        if self._phase == "idle":  # the head's clock starts with its first byte
            self._head_start = self._loop.time()
            self._head_bytes = 0
        self._phase = "head"
        self._target = []
        self._target_size = 0
        self._headers = []
        self._chunked = False
        self._body = []
        self._body_size = 0
        self._expects_continue = False

    def on_url(self, piece: bytes) -> None:
        self._target_size += len(piece)
        if self._target_size > MAX_TARGET:
            detail = f"the request target is longer than {MAX_TARGET} bytes"
            raise _Refused(414, "uri_too_long", detail)
        self._target.append(piece)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
            detail = f"a header field is longer than {MAX_FIELD} bytes"
            raise _Refused(431, "headers_too_large", detail)
        if len(self._headers) >= MAX_FIELDS:
            raise _Refused(431, "headers_too_large", "the request has too many header fields")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        announced: int | None = None
        expects = False
        for name, value in self._headers:  # the framing fields; llhttp vetted their values
            if len(name) not in (6, 14, 17):  # "expect", "content-length", "transfer-encoding"
                continue
            lowered = name.lower()
            if lowered == b"content-length":
                text = value.strip()
                announced = int(text) if text.isdigit() else None
            elif lowered == b"transfer-encoding":
                self._chunked = self._chunked or b"chunked" in value.lower()
            elif lowered == b"expect":
                expects = value.strip().lower() == b"100-continue"
        if announced is not None and announced > MAX_BODY:
            raise _Refused(413, "payload_too_large", f"a body here is at most {MAX_BODY} bytes")
        self._phase = "body"
        now = self._loop.time()
        self._window_start, self._window_bytes = now, 0
        self._expects_continue = expects and self._parser.get_http_version() == "1.1"
        if self._expects_continue and (self._chunked or bool(announced)):
            if self.busy:
                self._continue_held = True  # asked once the answers before it are out
            else:
                self._send_continue()

    def on_body(self, piece: bytes) -> None:
        self._body_size += len(piece)
        if self._body_size > MAX_BODY:
            raise _Refused(413, "payload_too_large", f"a body here is at most {MAX_BODY} bytes")
        self._body.append(piece)

    def on_message_complete(self) -> None:
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        request = _Request(
            method,
            b"".join(self._target).decode("utf-8", "surrogateescape"),
            self._headers,
            b"".join(self._body),
            parser.should_keep_alive(),
            self._chunked,
            _VERSIONS.get(parser.get_http_version(), HttpVersion11),
        )
        self._queue.append(request)
        self._phase = "idle"
        self._head_bytes = 0
        self._continue_held = False
        if len(self._queue) > MAX_QUEUED and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _send_continue(self) -> None:
        if self._transport is not None:
            self._transport.write(CONTINUE)
        self._continue_held = False
        self._window_start, self._window_bytes = self._loop.time(), self._body_size

    # --- answering -----------------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the first queued request, if none is being answered."""
        if self._task is not None or self._transport is None:
            return
        if self._queue:
            request = self._queue.popleft()
            self._task = self._loop.create_task(self._answer(request))
            return
        if self._last is not None:
            self._transport.write(self._last)
            self._linger(self._transport)
        elif self._close_after_queue:
            self._transport.close()
        elif self._continue_held and self._phase == "body":
            self._send_continue()

    async def _answer(self, request: _Request) -> None:
        close = not request.keep_alive or (self._close_after_queue and not self._queue)
        try:
            response = await self._listener.handler.handle(_Incoming(self, request))
            data = encode(response, head_only=request.head_only, close=close)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failure of keygate's own: a fixed 500, and logged
            name = type(exc).__name__
            log.error("an auth listener request failed (%s)%s", name, error_frames(exc))
            data = fixed_problem(500, "internal_error", "internal error; see the gateway log")
            close = True
        transport = self._transport
        self._task = None
        if transport is None:
            return
        transport.write(data)
        if close:
            transport.close()
            return
        self._idle_since = self._loop.time()
        self._arm(self._idle_since + self._guard.keepalive_timeout)  # usually a no-op
        if self._paused and len(self._queue) <= MAX_QUEUED // 2:
            self._paused = False
            transport.resume_reading()
        self._next()

    def as_aiohttp(
        self,
        request: _Request,
        headers: CIMultiDictProxy[str],
        method: str,
        target: str,
    ) -> web.BaseRequest:
        """``request`` as aiohttp's ``BaseRequest``, with ``method`` and ``target``."""
        message = RawRequestMessage(
            method,
            target,
            request.version,
            headers,
            tuple(request.raw_headers),
            not request.keep_alive,
            None,
            False,
            request.chunked,
            URL(target, encoded=True),
        )
        payload: StreamReader = EMPTY_PAYLOAD
        if request.body:
            payload = StreamReader(cast(BaseProtocol, self), len(request.body) + 1, loop=self._loop)
            payload.feed_data(request.body)
            payload.feed_eof()
        elif request.method not in ("GET", "HEAD"):
            payload = StreamReader(cast(BaseProtocol, self), 1, loop=self._loop)
            payload.feed_eof()
        task = self._task
        assert task is not None
        return web.BaseRequest(
            message,
            payload,
            cast(RequestHandler, self),
            cast(AbstractStreamWriter, None),  # never used: answers are written here
            task,
            self._loop,
            client_max_size=MAX_BODY,
        )

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after a refusal the client may still be sending into (a body over the
        cap): closing with its bytes unread would reset the connection, and the reset can
        destroy the answer before the client reads it. So: end our side, discard what
        comes, close when the client does or after ``LINGER`` seconds."""
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self._loop.call_later(LINGER, transport.close)

    def eof_received(self) -> bool | None:
        """The client ended its side: what it asked is still answered, then closed."""
        if self.busy and self._last is None:
            self._close_after_queue = True
            return True  # keep our side open for the answers
        return None  # close now

    def _refuse(self, answer: bytes) -> None:
        """A request the parser gave up on: the fixed answer once the answers before it
        are out, then close; nothing more is read."""
        self._last = answer
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._next()

    # --- the connection's clock ----------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        guard = self._guard
        now = self._loop.time()
        if self.busy or self._last is not None:
            deadline = now + min(guard.header_timeout, guard.keepalive_timeout)
        elif self._phase == "head":
            deadline = self._head_start + guard.header_timeout
            if now >= deadline:
                guard.timed_out("head")
                transport.close()
                return
        elif self._phase == "body":
            deadline = self._window_start + guard.body_timeout
            if now >= deadline:
                if not self._continue_held and (
                    self._body_size - self._window_bytes < guard.min_window_bytes
                ):
                    guard.timed_out("body")
                    transport.write(REQUEST_TIMEOUT)
                    transport.close()
                    return
                self._window_start, self._window_bytes = now, self._body_size
                deadline = now + guard.body_timeout
        else:
            deadline = self._idle_since + guard.keepalive_timeout
            if now >= deadline:
                guard.timed_out("idle")
                transport.close()
                return
        self._timer = self._loop.call_at(deadline, self._tick)


def _malformed(exc: httptools.HttpParserError, *, first_bytes: bytes) -> bytes:
    """The fixed answer to a head llhttp refused, in keygate's words (gateway/listener.py)."""
    if isinstance(exc, httptools.HttpParserInvalidMethodError) and first_bytes[:1] == b"\x16":
        log.debug("refused a TLS handshake on the auth listener")  # scanners: noise
        return fixed_problem(400, "invalid_request", "this port speaks plain HTTP, not TLS")
    message = str(exc.args[0]) if exc.args else ""
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        message = "Invalid method"
    detail = parser_detail(message)
    log.info("refused a malformed request with 400 (%s): %s", type(exc).__name__, detail)
    return fixed_problem(400, "invalid_request", detail)


class AuthListener:
    """The auth listener: its sockets, its connections and their guard."""

    def __init__(self, live: LiveProxy) -> None:
        self.handler = ForwardAuth(lambda: live.current)
        self.guard = ListenerGuard(
            "auth", live.settings, connection_budget(live.settings), live.metrics
        )
        self.connections: set[AuthConnection] = set()
        self._servers: list[asyncio.Server] = []

    async def start(self, sockets: Sequence[socket.socket]) -> None:
        """Serve on ``sockets`` (bound and listening already)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(
                lambda: AuthConnection(self), sock=sock, backlog=BACKLOG
            )
            self._servers.append(server)

    @property
    def addresses(self) -> list[str]:
        found: list[str] = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                found.append(f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name))
        return found

    async def close(self, grace: float) -> None:
        """Stop accepting; idle connections close now, ones with a request under way once
        it is answered or ``grace`` seconds have passed."""
        for server in self._servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while True:
            for connection in list(self.connections):
                if not connection.busy:
                    connection.close()
            if not self.connections or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
