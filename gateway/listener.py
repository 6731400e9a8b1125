"""Client connections on every listener (proxy, admin, metrics): slow and idle clients are
cut off, each process holds a bounded number of connections, and a request aiohttp cannot
parse gets a fixed answer that echoes nothing the client sent.

aiohttp's server on its own keeps an idle connection for 3630 s, gives a request head and
a request body all the time they want, accepts connections until the process runs out of
file descriptors, and answers a malformed request with a 400 quoting the offending bytes,
which it also logs with a traceback: a stray byte in an ``Authorization`` line put the
whole API key on stderr. ``ClientConnection`` (its per-connection protocol) closes those
gaps:

- a request head must be complete within ``client.header_timeout`` of the connection's
  opening (or, on a kept-alive connection, of the head's first byte), and an idle
  connection closes after ``client.keepalive_timeout``. Both run on aiohttp's own
  keep-alive timer handle, re-armed only when a head arrives in pieces, so a request whose
  head comes in one packet (nearly all) costs no timer operation at all;
- a request body must make progress: every ``client.body_timeout`` seconds at least
  ``body_timeout * min_upload_rate`` bytes (and one) must have arrived, unless keygate
  itself stopped reading (it waits for an upstream connection) or the client waits for
  ``100 Continue``. One timer per connection, armed only for bodies that do not arrive
  with their head. A body that stalls gets 408 (or, when the response has started, its
  connection is cut); either way the connection closes, which cancels the proxy's handler
  and with it the upstream exchange, freeing its pool slot;
- a listener holds at most its cap of connections; one more is closed at once;
- a malformed request gets a fixed RFC 9457 problem (400, 414 or 431) and one log line
  naming the exception class, never the request's bytes.

The auth listener has its own server (gateway/forward_auth/wire.py) and applies the same
limits there with ``ListenerGuard`` and the fixed answers below.

Timeouts and refusals are counted in keygate_client_timeouts_total and
keygate_client_connections_refused_total; keygate_client_connections shows the open ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from aiohttp import http_exceptions, web
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from gateway.config.model import Settings
from gateway.metrics import Metrics

log = logging.getLogger("keygate.client")

# The admin and metrics listeners serve operators and scrapers, not the public: a small cap
# of their own, so a flood of proxy clients never locks a health probe out.
OPERATOR_CONNECTIONS: Final = 64
# Descriptors a process needs beside client and upstream sockets: Redis connections,
# listening sockets, log and metrics files, the embedded server's pipes.
RESERVED_DESCRIPTORS: Final = 64
MIN_AUTO_CONNECTIONS: Final = 16

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def connection_budget(settings: Settings, descriptors: int | None = None) -> int:
    """The proxy listener's connection cap per process: ``client.max_connections``, or
    (auto) the soft RLIMIT_NOFILE (``descriptors``) less every descriptor the rest of the
    process may hold: upstream pools (twice for upstreams with WebSocket routes, which have
    a pool of their own), the operator listeners and a reserve for Redis and files."""
    configured = settings.client.max_connections
    if descriptors is None:
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if descriptors == resource.RLIM_INFINITY:
            descriptors = 1 << 20
    upstream = sum(u.pool_size for u in settings.upstreams.values())
    websocket = {route.upstream for route in settings.routes if route.websocket}
    upstream += sum(settings.upstreams[name].pool_size for name in websocket)
    operators = OPERATOR_CONNECTIONS * (2 if settings.metrics.listen is not None else 1)
    budget = descriptors - upstream - operators - RESERVED_DESCRIPTORS
    if configured is not None:
        if configured > budget:
            log.warning(
                "client.max_connections is %d, but the file descriptor limit (%d) leaves room "
                "for %d beside %d upstream sockets: past that, accepting fails",
                configured,
                descriptors,
                max(budget, 0),
                upstream,
            )
        return configured
    if budget < MIN_AUTO_CONNECTIONS:
        log.warning(
            "the file descriptor limit (%d) leaves room for %d client connections beside "
            "%d upstream sockets; raise it (ulimit -n, LimitNOFILE) or set "
            "client.max_connections",
            descriptors,
            budget,
            upstream,
        )
        return MIN_AUTO_CONNECTIONS
    return budget


class ListenerGuard:
    """One listener's limits and counts, shared by its connections."""

    __slots__ = (
        "_connections",
        "_refused",
        "_timeouts",
        "body_timeout",
        "cap",
        "header_timeout",
        "keepalive_timeout",
        "min_window_bytes",
        "open",
    )

    def __init__(self, name: str, settings: Settings, cap: int, metrics: Metrics) -> None:
        client = settings.client
        self.header_timeout = client.header_timeout
        self.keepalive_timeout = client.keepalive_timeout
        self.body_timeout = client.body_timeout
        # What a body must bring in each body_timeout window: at least one byte.
        self.min_window_bytes = max(1, int(client.min_upload_rate * client.body_timeout))
        self.cap = cap
        self.open = 0
        self._connections = metrics.client_connections.labels(name)
        metrics.client_connections_max.labels(name).set(cap)
        self._refused = metrics.client_refused.labels(name)
        self._timeouts = {
            phase: metrics.client_timeouts.labels(name, phase) for phase in ("head", "idle", "body")
        }

    def admit(self) -> bool:
        if self.open >= self.cap:
            self._refused.inc()
            return False
        self.open += 1
        self._connections.inc()
        return True

    def release(self) -> None:
        self.open -= 1
        self._connections.dec()

    def timed_out(self, phase: str) -> None:
        self._timeouts[phase].inc()


# --- fixed answers -------------------------------------------------------------------------

_TITLES = {
    400: "Invalid request",
    408: "Request timeout",
    413: "Payload too large",
    414: "URI too long",
    431: "Request headers too large",
    500: "Internal error",
    504: "Gateway timeout",
}


def _problem_body(status: int, code: str, detail: str) -> str:
    return json.dumps(
        {
            "type": f"urn:keygate:error:{code}",
            "title": _TITLES[status],
            "status": status,
            "detail": detail,
            "code": code,
        }
    )


def fixed_problem(status: int, code: str, detail: str) -> bytes:
    """A fixed problem as a whole HTTP/1.1 answer that closes its connection (the auth
    listener writes its own bytes)."""
    body = _problem_body(status, code, detail).encode()
    reason = _REASONS.get(status, _TITLES[status])
    return (
        b"HTTP/1.1 %d %b\r\nContent-Type: application/problem+json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
        % (status, reason.encode(), len(body), body)
    )


_REASONS = {  # the status lines' reason phrases (RFC 9110)
    400: "Bad Request",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def _problem(status: int, code: str, detail: str) -> web.Response:
    text = _problem_body(status, code, detail)
    response = web.Response(status=status, text=text, content_type="application/problem+json")
    response.force_close()
    return response


_TIMEOUT_BODY = _problem_body(408, "request_timeout", "the request body stopped arriving").encode()
REQUEST_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/problem+json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)

# llhttp's reasons (the text before the quoted bytes in aiohttp's message), by prefix, and
# what keygate says instead: its own words, so no byte of the request can come back.
_PARSER_REASONS = (
    ("Invalid header value char", "a header value holds a character HTTP does not allow"),
    ("Invalid header field char", "a header name holds a character HTTP does not allow"),
    ("Invalid header token", "a header name holds a character HTTP does not allow"),
    ("Missing expected CR", "a line of the request head does not end with CR LF"),
    ("Missing expected LF", "a line of the request head does not end with CR LF"),
    ("Expected CRLF", "a line of the request head does not end with CR LF"),
    ("Invalid method", "the request method is not a valid token"),
    ("Expected HTTP/", "the request line does not end with an HTTP version"),
    ("Invalid HTTP version", "the request line does not end with a valid HTTP version"),
    ("Invalid char in url", "the request target holds a character a URL does not allow"),
    ("Content-Length can't be present", "the request has both Content-Length and chunked"),
    ("Duplicate Content-Length", "the request has Content-Length more than once"),
    ("Invalid character in Content-Length", "the request's Content-Length is not a number"),
    ("Request has invalid `Transfer-Encoding`", "the request's Transfer-Encoding is not valid"),
    ("Invalid character in chunk size", "a chunk size of the request body is not valid"),
)


def parser_detail(message: str) -> str:
    """keygate's words for an llhttp error message (nothing of the request in them)."""
    for reason, detail in _PARSER_REASONS:
        if message.startswith(reason):
            return detail
    return "the request head is not valid HTTP/1.1"


def malformed(exc: BaseException, url_limit: int, field_limit: int) -> tuple[int, str, str]:
    """Status, code and detail for a request aiohttp could not parse: fixed phrases only."""
    if isinstance(exc, http_exceptions.LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else field_limit
        # aiohttp's C parser reports the request target as a bytearray and header fields as
        # bytes; the limits tell them apart in the pure-Python parser.
        target = isinstance(exc.args[0], bytearray) or (
            limit == url_limit and url_limit != field_limit
        )
        if target:
            return 414, "uri_too_long", f"the request target is longer than {url_limit} bytes"
        return 431, "headers_too_large", f"a header field is longer than {field_limit} bytes"
    message = exc.message if isinstance(exc, http_exceptions.HttpProcessingError) else ""
    if message == "Too many headers received":
        return 431, "headers_too_large", "the request has too many header fields"
    if isinstance(exc, http_exceptions.BadHttpMethod) and message.startswith("Received HTTPS"):
        return 400, "invalid_request", "this port speaks plain HTTP, not TLS"
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return 400, "invalid_request", "the request body does not match its framing"
    if isinstance(exc, http_exceptions.InvalidHeader):
        return 400, "invalid_request", "a header field is not valid"
    if message.startswith("Duplicate '"):
        return 400, "invalid_request", "a header field that may appear once appears twice"
    for reason, detail in _PARSER_REASONS:
        if message.startswith(reason):
            return 400, "invalid_request", detail
    if isinstance(exc, http_exceptions.BadStatusLine):
        return 400, "invalid_request", "the request line is not valid HTTP/1.1"
    return 400, "invalid_request", "the request head is not valid HTTP/1.1"


def error_frames(exc: BaseException | None) -> str:
    """Where an exception came from, without its message (which may quote a request)."""
    if exc is None or exc.__traceback__ is None:
        return ""
    return "\n" + "".join(traceback.format_tb(exc.__traceback__)).rstrip()


# --- the connection ------------------------------------------------------------------------

TIMED_OUT: Final = web.RequestKey("keygate_body_timed_out", bool)  # 408 went out


class ClientConnection(RequestHandler):
    """aiohttp's protocol for one client connection, with the limits described above."""

    __slots__ = (
        "_admitted",
        "_body",
        "_body_bytes",
        "_body_handle",
        "_guard",
        "_head_clock",
        "_held",
        "_window_bytes",
        "_window_start",
        "continue_for",
    )

    def __init__(self, manager: GuardedServer, guard: ListenerGuard, **options: Any) -> None:
        super().__init__(manager, keepalive_timeout=guard.keepalive_timeout, **options)
        self._guard = guard
        self._admitted = False
        self._head_clock = True  # the first head's clock starts with the connection
        self._body: StreamReader | None = None  # a request body still arriving
        self._body_bytes = 0
        self._body_handle: asyncio.TimerHandle | None = None
        self._window_start = 0.0
        self._window_bytes = 0
        self._held = False  # keygate stopped reading during this window
        # The body of the request whose client waits for 100 Continue before sending it.
        self.continue_for: StreamReader | None = None

    # --- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit():
            self._manager = None  # never registered: connection_lost has nothing to undo
            cast(asyncio.Transport, transport).abort()
            return
        self._admitted = True
        super().connection_made(transport)
        # aiohttp armed its timer for keepalive_timeout; the first head has header_timeout.
        self._arm(self._loop.time() + self._guard.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._guard.release()
        if self._body_handle is not None:
            self._body_handle.cancel()
            self._body_handle = None
        self._body = self.continue_for = None
        super().connection_lost(exc)

    def _arm(self, deadline: float) -> None:
        """Close the connection at ``deadline`` unless a request is under way by then
        (aiohttp's keep-alive check, moved earlier when need be)."""
        self._next_keepalive_close_time = deadline
        # aiohttp's handle is always a call_at (a TimerHandle), typed as a plain Handle.
        handle = cast(asyncio.TimerHandle | None, self._keepalive_handle)
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._keepalive_handle = self._loop.call_at(deadline, self._process_keepalive)

    def _process_keepalive(self) -> None:
        closing = self._force_close
        super()._process_keepalive()
        if self._force_close and not closing:
            self._guard.timed_out("head" if self._head_clock else "idle")

    # --- reading -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            self._body_bytes += len(data)
        queued = len(self._messages)
        super().data_received(data)
        if body is not None and body.is_eof():
            self._body = None
        if len(self._messages) > queued:  # a head is complete: its request is queued
            message, payload = self._messages[-1]
            self._head_clock = False
            if not payload.is_eof():
                self._watch_body(message, payload)
        elif not self._head_clock and self._body is None and not self._request_in_progress:
            # The first bytes of a head after an idle spell: it has header_timeout from now.
            self._head_clock = True
            self._arm(self._loop.time() + self._guard.header_timeout)

    def pause_reading(self) -> None:
        self._held = True  # keygate, not the client, stops the body for now
        super().pause_reading()

    def _watch_body(self, message: object, payload: StreamReader) -> None:
        """A request body that did not come with its head: it must keep arriving."""
        loop = self._loop
        self._body = payload
        self._body_bytes = self._window_bytes = 0
        self._window_start = loop.time()
        expects = (
            isinstance(message, RawRequestMessage)
            and message.version >= HttpVersion11
            and message.headers.get("Expect", "").lower() == "100-continue"
        )
        self.continue_for = payload if expects else None
        # A client waiting for 100 Continue sends nothing until asked, which the proxy does
        # within a Redis round trip: that excuses the first window, not every one after.
        self._held = expects
        if self._body_handle is None:  # else the pending check comes sooner and re-arms
            self._body_handle = loop.call_at(
                self._window_start + self._guard.body_timeout, self._check_body
            )

    def _check_body(self) -> None:
        self._body_handle = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None or self._force_close:
            self._body = None
            return
        loop = self._loop
        now = loop.time()
        due = self._window_start + self._guard.body_timeout
        if now < due:  # armed for an earlier body, or for this one's window end
            self._body_handle = loop.call_at(due, self._check_body)
            return
        if not self._held and self._body_bytes - self._window_bytes < self._guard.min_window_bytes:
            self._body_timed_out(body)
            return
        self._window_start, self._window_bytes = now, self._body_bytes
        self._held = self._reading_paused
        self._body_handle = loop.call_at(now + self._guard.body_timeout, self._check_body)

    def _body_timed_out(self, body: StreamReader) -> None:
        """408 if the body's request has no response yet, else cut; close either way."""
        self._guard.timed_out("body")
        self._body = None
        request = self._current_request
        transport = self.transport
        if (
            request is not None
            and request.content is body
            and request.writer.output_size == 0
            and transport is not None
        ):
            request[TIMED_OUT] = True
            transport.write(REQUEST_TIMEOUT)
        self.force_close()  # the handler is cancelled, its upstream exchange dropped

    # --- Expect: 100-continue ------------------------------------------------------------

    def body_requested(self) -> None:
        """100 Continue went out: the client sends its body now."""
        self.continue_for = None

    def body_refused(self) -> None:
        """A final answer went out before the client was asked for its body: the connection
        closes once the answer is out, without waiting (aiohttp's lingering) for a body the
        client will not send."""
        self.continue_for = None
        self._lingering_time = 0.0

    # --- errors --------------------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400) or whose handler failed
        (500, 504), as a fixed problem; logged without the exception's message."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started: the connection is cut instead")
        name = type(exc).__name__ if exc is not None else "-"
        if isinstance(exc, http_exceptions.HttpProcessingError):
            status, code, detail = malformed(exc, self.max_line_size, self.max_field_size)
            # Non-HTTP bytes on the first request are scanners and TLS clients: noise.
            first = self._request_count == 1 and isinstance(exc, http_exceptions.BadHttpMethod)
            log.log(
                logging.DEBUG if first else logging.INFO,
                "refused a malformed request with %d (%s): %s",
                status,
                name,
                detail,
            )
            return _problem(status, code, detail)
        if status == 504:
            return _problem(504, "gateway_timeout", "the request took too long")
        log.error("a request handler failed (%s)%s", name, error_frames(exc))
        return _problem(500, "internal_error", "internal error; see the gateway log")

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other error logs on this connection, without the exception's message."""
        exc = kw.get("exc_info")
        error = exc if isinstance(exc, BaseException) else None
        log.error("error on a client connection (%s)%s", type(error).__name__, error_frames(error))


def unanswered_status(request: web.BaseRequest) -> int:
    """The status to record for a request whose handler gave no response: 408 when its
    body stalled (the connection answered it), else 499 (nginx's: the client left)."""
    return 408 if request.get(TIMED_OUT, False) else 499


# --- servers and runners -------------------------------------------------------------------


class GuardedServer(web.Server):
    """aiohttp's low-level server, whose connections are ClientConnections."""

    def __init__(self, handler: Handler, guard: ListenerGuard, **options: Any) -> None:
        super().__init__(handler, **options)
        self.guard = guard
        self._options = {k: v for k, v in options.items() if k not in _SERVER_OPTIONS}

    def __call__(self) -> RequestHandler:
        return ClientConnection(self, self.guard, loop=self._loop, **self._options)


_SERVER_OPTIONS = frozenset(("request_factory", "handler_cancellation", "loop"))


class GuardedAppRunner(web.AppRunner):
    """An application's runner whose server is a GuardedServer (the admin and metrics
    listeners); the application's startup and cleanup signals run as usual."""

    def __init__(self, app: web.Application, guard: ListenerGuard, **options: Any) -> None:
        super().__init__(app, **options)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup and freezes it
        return GuardedServer(
            plain.request_handler,
            self._guard,
            request_factory=plain.request_factory,
            access_log=None,
        )


def proxy_server(handler: Handler, settings: Settings, metrics: Metrics) -> GuardedServer:
    """The proxy listener's server: its handler is cancelled when the client disconnects
    (which drops the upstream exchange), and no access log of aiohttp's (keygate has its
    own)."""
    guard = ListenerGuard("proxy", settings, connection_budget(settings), metrics)
    return GuardedServer(handler, guard, handler_cancellation=True, access_log=None)


def operator_runner(
    app: web.Application,
    settings: Settings,
    metrics: Metrics,
    *,
    shutdown_timeout: float,
    listener: str = "admin",
) -> web.AppRunner:
    """The runner of an operator listener (``admin`` or ``metrics``)."""
    guard = ListenerGuard(listener, settings, OPERATOR_CONNECTIONS, metrics)
    return GuardedAppRunner(
        app, guard, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
