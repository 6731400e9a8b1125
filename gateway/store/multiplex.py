"""Auto-pipelined Redis calls: every command of one event-loop turn goes out in one write.

The proxy makes one or two Redis calls per request. Sent one by one (redis-py's pool: one
write and one read per call), they cost a large share of the proxy's throughput. Here, like
ioredis, the commands issued by all concurrent requests during one event-loop turn are
packed into one buffer and written once, at the end of the turn; one reader matches replies
to callers in FIFO order. Pipelining continues across turns: the next turn's batch is
written without waiting for the previous batch's replies.

One connection carries everything, so only stateless, non-blocking commands belong here
(no MULTI/WATCH/SELECT/SUBSCRIBE/BLPOP: they would change or stall the shared connection).
Replies use RESP2.

Failure contract: a call fails with redis.exceptions.TimeoutError when its reply is more
than ``socket_timeout`` late (the connection is then presumed broken: it is closed and every
call still in flight on it fails too, so a late reply can never reach the wrong caller), and
with redis.exceptions.ConnectionError when the connection is lost. Connecting is lazy,
bounded by ``connect_timeout`` and shared by concurrent callers; a failed attempt leaves
nothing behind, so the next call simply tries again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float

# hiredis returns this (instead of False, which RESP3 could mean) when a reply is incomplete.
_NEED_MORE: Final = object()
_CLOSE_WAIT = 1.0  # seconds close() waits for the transport to report it is gone


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script and its SHA1, as EVALSHA names it."""

    source: str
    sha: str

    @classmethod
    def from_source(cls, source: str) -> LuaScript:
        digest = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
        return cls(source, digest)


@dataclass(slots=True)
class MultiplexStats:
    """Counters since the multiplexer was made: ``commands / writes`` is the batching factor."""

    writes: int = 0  # socket writes (one per event-loop turn that had commands)
    commands: int = 0  # commands written, connection set-up (AUTH, SELECT) included
    connects: int = 0  # connections established (the first one, then reconnects)
    timeouts: int = 0  # connections closed because a reply was overdue


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """Where to connect and what to send first, parsed once from the URL."""

    host: str
    port: int
    path: str | None  # unix socket
    tls: ssl.SSLContext | None
    setup: tuple[tuple[Arg, ...], ...]  # AUTH and SELECT, sent before anything else

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path else f"{self.host}:{self.port}"


def _endpoint(url: str) -> _Endpoint:
    """Parse ``redis://[user:password@]host:port/db``, ``rediss://...`` or ``unix://path?db=N``.

    TLS options understood in the query: ssl_cert_reqs (none|optional|required),
    ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname. Other redis-py options
    (socket_timeout, ...) are ignored, so one URL can serve both clients.
    """
    parts = urlsplit(url)
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://: {url!r}")
    path: str | None = None
    db = query.get("db", "")
    if parts.scheme == "unix":
        path = unquote(parts.path)
    elif parts.path.strip("/"):
        db = parts.path.strip("/")
    setup: list[tuple[Arg, ...]] = []
    if parts.password is not None:
        password = unquote(parts.password)
        username = unquote(parts.username or "")
        setup.append(("AUTH", username, password) if username else ("AUTH", password))
    if db and int(db) != 0:
        setup.append(("SELECT", int(db)))
    return _Endpoint(
        host=parts.hostname or "localhost",
        port=parts.port or 6379,
        path=path,
        tls=_tls_context(query) if parts.scheme == "rediss" else None,
        setup=tuple(setup),
    )


def _tls_context(query: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    if query.get("ssl_certfile"):
        context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
    requirement = query.get("ssl_cert_reqs", "required").lower()
    if requirement == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif requirement == "optional":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    if query.get("ssl_check_hostname", "").lower() in ("false", "0", "no"):
        context.check_hostname = False
    return context


def _pack(args: tuple[Arg, ...]) -> bytes:
    if not args:
        # Redis answers an empty command with nothing at all: the FIFO would shift by one.
        raise DataError("a Redis command needs at least its name")
    try:
        return hiredis.pack_command(args)  # type: ignore[arg-type,no-any-return]  # C, ~3x Python's
    except TypeError:
        raise DataError(f"Redis arguments must be str, bytes, int or float: {args!r}") from None


class _LateReplies(dict[asyncio.Future[Any], Callable[[Any], None]]):
    """Handlers for the replies of cancelled callers, and who waits for them all."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[asyncio.Future[None]] = []

    def take(self, future: asyncio.Future[Any]) -> Callable[[Any], None] | None:
        handler = self.pop(future, None)
        if not self and self.waiters:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return handler


class _Connection(asyncio.Protocol):
    """One socket: per-turn batches out, replies in, matched to futures strictly in order.

    ``pending`` holds a future for every command sent (or about to be sent this turn) and
    not yet answered, oldest first. A cancelled caller's future stays in it (cancelled): its
    reply is read and dropped, so every later reply still reaches its own caller.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        decode: bool,
        stats: MultiplexStats,
        late: _LateReplies,
    ) -> None:
        self.open = False  # True from connect until the first failure or close
        self._late = late  # a cancelled caller's handler for its reply (see when_cancelled)
        self.lost: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._timeout = timeout
        self._stats = stats
        self._reader = hiredis.Reader(
            replyError=BaseParser.parse_error,  # redis-py's classes: NoScriptError, ...
            notEnoughData=_NEED_MORE,
            encoding="utf-8" if decode else None,
        )
        self._transport: asyncio.Transport | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._out: list[bytes] = []  # this turn's packed commands
        self._flush_handle: asyncio.Handle | None = None
        # One entry per write: (number of the write's last command, reply deadline). The
        # watchdog only ever looks at the oldest unanswered write: one timer per connection
        # instead of one per call.
        self._batches: collections.deque[tuple[int, float]] = collections.deque()
        self._sent = 0
        self._answered = 0
        self._watchdog: asyncio.TimerHandle | None = None

    # --- sending ---------------------------------------------------------------------------

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one packed command for this turn's write; the future gets its reply."""
        future = self._loop.create_future()
        if not self.open:
            future.set_exception(RedisConnectionError("the Redis connection is closed"))
            return future
        self._out.append(packed)
        self._pending.append(future)
        self._sent += 1
        if self._flush_handle is None:
            # call_soon runs after every callback already ready in this turn, so commands
            # from all the requests woken in this turn share the write.
            self._flush_handle = self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, []
        if not out or self._transport is None:
            return
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        self._stats.writes += 1
        self._stats.commands += len(out)
        deadline = self._loop.time() + self._timeout
        self._batches.append((self._sent, deadline))
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._check_overdue)

    def _check_overdue(self) -> None:
        self._watchdog = None
        self._forget_answered_batches()
        if not self._batches:
            return  # re-armed by the next write
        deadline = self._batches[0][1]
        if deadline <= self._loop.time():
            self._stats.timeouts += 1
            self._fail(RedisTimeoutError, f"no reply from Redis within {self._timeout:g}s")
        else:
            self._watchdog = self._loop.call_at(deadline, self._check_overdue)

    def _forget_answered_batches(self) -> None:
        batches = self._batches
        while batches and batches[0][0] <= self._answered:
            batches.popleft()

    # --- receiving -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self.open = True

    def data_received(self, data: bytes) -> None:
        reader, pending = self._reader, self._pending
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError, f"Redis protocol error: {exc}")
                return
            except UnicodeDecodeError as exc:  # the whole reply was consumed: only it fails
                reply = DataError(f"Redis reply is not UTF-8 text: {exc}")
            if reply is _NEED_MORE:
                break
            if not pending:
                self._fail(RedisConnectionError, "Redis sent a reply nobody asked for")
                return
            future = pending.popleft()
            self._answered += 1
            if future.done():  # its caller was cancelled: drop the reply, or hand it over
                handler = self._late.take(future) if self._late else None
                if handler is not None:
                    handler(reply)
                continue
            # Error replies arrive as exception instances (replyError above); nested ones
            # (inside an array) stay values, as in redis-py.
            if isinstance(reply, RedisError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        self._forget_answered_batches()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(RedisConnectionError, f"connection to Redis lost{reason}")
        if not self.lost.done():
            self.lost.set_result(None)

    # --- ending ----------------------------------------------------------------------------

    def close(self) -> None:
        self._fail(RedisConnectionError, "the Redis client was closed")

    def _fail(self, kind: type[RedisError], message: str) -> None:
        """Close the socket and fail every call in flight on it (each with its own error)."""
        self.open = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out.clear()
        self._batches.clear()
        pending, self._pending = self._pending, collections.deque()
        for future in pending:
            if not future.done():
                future.set_exception(kind(message))
            elif self._late:
                self._late.take(future)  # no reply will come: whether it ran is unknown
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()  # nothing more is read from it: late replies are dropped


class RedisMultiplexer:
    """A Redis client that coalesces the commands of concurrent callers (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        socket_timeout: float,
        decode_responses: bool = True,
    ) -> None:
        self.stats = MultiplexStats()
        self._endpoint = _endpoint(url)
        self._connect_timeout = connect_timeout
        self._socket_timeout = socket_timeout
        self._decode = decode_responses
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False
        self._late = _LateReplies()

    async def execute(self, *args: Arg) -> Any:
        """Send one command in this turn's batch; its reply, or its error reply raised."""
        packed = _pack(args)
        connection = self._connection
        if connection is None or not connection.open:
            connection = await self._connect()
        return await connection.send(packed)

    async def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run ``script`` by its SHA; if the server lost its script cache, send the source.

        EVAL also caches the script, so only the first call after a restart (or SCRIPT
        FLUSH) pays for the source.
        """
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    def submit(self, *args: Arg) -> asyncio.Future[Any] | None:
        """Queue one command in this turn's batch without a coroutine or task: its reply's
        future, or None when no connection is open (nothing was sent; see ``connect``)."""
        connection = self._connection
        if connection is None or not connection.open:
            return None
        return connection.send(_pack(args))

    async def run_script(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[Arg],
        when_cancelled: Callable[[Any], None],
    ) -> Any:
        """``evalsha``, for a script whose effects must not be lost with its caller: if the
        caller is cancelled after the script was sent, ``when_cancelled`` gets the reply
        when it arrives (not an error reply; nothing when the connection fails first)."""
        tail = (len(keys), *keys, *args)
        for head in (("EVALSHA", script.sha), ("EVAL", script.source)):
            connection = self._connection
            if connection is None or not connection.open:
                connection = await self._connect()
            future = connection.send(_pack((*head, *tail)))
            try:
                return await future
            except NoScriptError:
                continue  # not run: the server lost its script cache; EVAL loads it
            except asyncio.CancelledError:
                if future.cancelled():
                    self._late[future] = lambda reply: (
                        None if isinstance(reply, Exception) else when_cancelled(reply)
                    )
                raise
        raise AssertionError("EVAL does not answer NOSCRIPT")

    async def late_replies_handled(self) -> None:
        """Return once the replies of cancelled ``run_script`` calls have reached their
        handlers (or their connection failed): on shutdown, before draining what they do."""
        if self._late:
            waiter = asyncio.get_running_loop().create_future()
            self._late.waiters.append(waiter)
            await waiter

    async def connect(self) -> None:
        """Open the connection if none is open; raises when it cannot (nothing is sent)."""
        connection = self._connection
        if connection is None or not connection.open:
            await self._connect()

    async def close(self) -> None:
        """Fail calls in flight with ConnectionError and close the socket; later calls fail."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait([self._connecting])
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_WAIT):
                    await connection.lost

    # --- connecting ------------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        """The shared connection attempt: started by the first caller, awaited by all."""
        if self._closed:
            raise RedisConnectionError("the Redis client was closed")
        attempt = self._connecting
        if attempt is None:
            attempt = asyncio.get_running_loop().create_task(self._open())
            attempt.add_done_callback(self._opened)
            self._connecting = attempt
        try:
            # shield: one caller giving up must not cancel the attempt the others wait on.
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.cancelled() and task is not None and not task.cancelling():
                raise RedisConnectionError("the Redis client was closed") from None
            raise

    def _opened(self, attempt: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if attempt.cancelled() or attempt.exception() is not None:
            return  # nothing kept: the next call tries again
        connection = attempt.result()
        if self._closed:
            connection.close()
        else:
            self._connection = connection

    async def _open(self) -> _Connection:
        """Connect and send AUTH/SELECT, all within connect_timeout."""
        loop = asyncio.get_running_loop()
        endpoint = self._endpoint

        def protocol() -> _Connection:
            return _Connection(loop, self._socket_timeout, self._decode, self.stats, self._late)

        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if endpoint.path is not None:
                    _, connection = await loop.create_unix_connection(protocol, endpoint.path)
                else:
                    _, connection = await loop.create_connection(
                        protocol,
                        endpoint.host,
                        endpoint.port,
                        ssl=endpoint.tls,
                        server_hostname=endpoint.host if endpoint.tls else None,
                    )
                replies = await asyncio.gather(
                    *(connection.send(_pack(command)) for command in endpoint.setup),
                    return_exceptions=True,
                )
                for reply in replies:
                    if isinstance(reply, BaseException):
                        raise reply  # AUTH's error first: SELECT fails only because of it
        except BaseException as exc:
            if connection is not None:
                connection.close()
            if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
                raise RedisTimeoutError(
                    f"connecting to Redis at {endpoint} took over {self._connect_timeout:g}s"
                ) from None
            if isinstance(exc, OSError):
                message = f"cannot connect to Redis at {endpoint}: {exc}"
                raise RedisConnectionError(message) from None
            raise
        self.stats.connects += 1
        return connection
