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
nothing behind, so the next call simply tries again. Behind Sentinel, each sentinel gets
an equal share of ``connect_timeout``, so one that accepts and never answers cannot use up
the whole budget; one that failed is asked last from then on.

A connection that dies while idle (a NAT or firewall that dropped it says nothing to
either end) is found before a request needs it: TCP keepalive on the socket, and a PING
once the connection has been idle for ``health_check_interval`` seconds, whose reply is
watched like any other (overdue past ``socket_timeout``: the connection is failed, and the
next call reconnects). The PING is sent only while idle: no round trip is added to a call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RedisSettings
from gateway.store.topology import RedisTarget, parse_target

Arg = str | bytes | int | float

# hiredis returns this (instead of False, which RESP3 could mean) when a reply is incomplete.
_NEED_MORE: Final = object()
_CLOSE_WAIT = 1.0  # seconds close() waits for the transport to report it is gone
_ASKING: Final = b"*1\r\n$6\r\nASKING\r\n"
_PING: Final = b"*1\r\n$4\r\nPING\r\n"
# TCP keepalive on every Redis socket: the first probe after this many idle seconds, then
# one every _KEEPALIVE_INTERVAL; _KEEPALIVE_COUNT unanswered probes and the kernel fails
# the socket. The kernel's defaults (two hours before the first probe) outlast most NATs'
# idle timeouts, so without these a dropped mapping would never be noticed.
_KEEPALIVE_IDLE = 15
_KEEPALIVE_INTERVAL = 5
_KEEPALIVE_COUNT = 3
_NO_PASSWORD: Final = "called without any password configured"


def _nothing() -> None:
    return None


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
    health_checks: int = 0  # PINGs sent on connections idle for health_check_interval
    unreplicated: int = 0  # batches that fewer replicas than replica_acks confirmed in time


@dataclass(frozen=True, slots=True)
class ReplicaAcks:
    """WAIT after each batch (redis.replica_acks): for how many replicas, how long."""

    acks: int
    seconds: float
    command: bytes = b""  # packed once

    def __post_init__(self) -> None:
        wait = ("WAIT", self.acks, max(1, round(self.seconds * 1000)))
        object.__setattr__(self, "command", _pack(wait))


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """Where to connect and what to send first."""

    host: str
    port: int
    path: str | None  # unix socket
    tls: ssl.SSLContext | None
    setup: tuple[tuple[Arg, ...], ...]  # AUTH and SELECT, sent before anything else

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path else f"{self.host}:{self.port}"


def endpoint(
    target: RedisTarget, address: tuple[str, int] | None = None, tls: ssl.SSLContext | None = None
) -> _Endpoint:
    """The data connection to ``address`` (default: the target's one server); ``tls`` is
    the target's TLS context when the caller already made one (it reads files)."""
    host, port = address or (target.hosts[0] if target.hosts else ("localhost", 6379))
    return _Endpoint(
        host=host,
        port=port,
        path=target.path if address is None else None,
        tls=tls or (target.tls.context() if target.tls else None),
        setup=target.auth_commands(),
    )


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
        acks: ReplicaAcks | None = None,
        unreplicated: Callable[[], None] = _nothing,
        idle_check: float = 0.0,
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
        # With replica_acks: every batch ends with WAIT, and its callers get their replies
        # only when WAIT answers (each caller's future, with the future its reply fills).
        # While a WAIT is out, new commands wait for it and then go together: WAITs never
        # queue up behind each other on the connection.
        self._acks = acks
        self._waiting = False
        self._unreplicated = unreplicated
        self._held: list[tuple[asyncio.Future[Any], asyncio.Future[Any]]] = []
        # With idle_check (seconds): a PING once nothing has been written for that long, so
        # a connection that died unused fails by the watchdog, not on a request. One timer
        # per connection, moved along by writes; never a PING while replies are due (the
        # watchdog watches those already).
        self._idle_check = idle_check
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_write = 0.0

    # --- sending ---------------------------------------------------------------------------

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one packed command for this turn's write; the future gets its reply."""
        future = self._loop.create_future()
        if not self.open:
            future.set_exception(RedisConnectionError("the Redis connection is closed"))
            return future
        self._out.append(packed)
        if self._acks is None:
            self._pending.append(future)
        else:
            reply = self._loop.create_future()
            self._pending.append(reply)
            self._held.append((future, reply))
        self._sent += 1
        if self._flush_handle is None:
            # call_soon runs after every callback already ready in this turn, so commands
            # from all the requests woken in this turn share the write.
            self._flush_handle = self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._out or self._transport is None:
            return
        extra = 0.0  # WAIT's own time, on top of socket_timeout
        if self._acks is not None and self._held:
            if self._waiting:
                return  # sent with the next WAIT, once this one answers (_release)
            held, self._held = self._held, []
            waited = self._loop.create_future()
            waited.add_done_callback(lambda done: self._release(held, done))
            self._out.append(self._acks.command)
            self._pending.append(waited)
            self._sent += 1
            self._waiting = True
            extra = self._acks.seconds
        out, self._out = self._out, []
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        self._stats.writes += 1
        self._stats.commands += len(out)
        self._last_write = now = self._loop.time()
        deadline = now + self._timeout + extra
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

    def _check_idle(self) -> None:
        """Send a PING if nothing was written for idle_check seconds and no reply is due;
        then look again when the connection will next have been idle that long."""
        self._idle_timer = None
        if not self.open:
            return
        now = self._loop.time()
        due = self._last_write + self._idle_check
        if due <= now:
            if not self._pending and not self._out:
                self._stats.health_checks += 1
                self.send(_PING).add_done_callback(_consume)  # overdue: the watchdog fails it
            due = now + self._idle_check
        self._idle_timer = self._loop.call_at(due, self._check_idle)

    def _forget_answered_batches(self) -> None:
        batches = self._batches
        while batches and batches[0][0] <= self._answered:
            batches.popleft()

    def _release(
        self,
        held: list[tuple[asyncio.Future[Any], asyncio.Future[Any]]],
        waited: asyncio.Future[Any],
    ) -> None:
        """WAIT answered (or the connection failed first): hand each caller its reply. A
        reply whose WAIT failed is not handed over: the write may not be on a replica."""
        self._waiting = False
        if self._out and self._flush_handle is None and self.open:
            self._flush_handle = self._loop.call_soon(self._flush)  # what waited for this
        failure = waited.exception()
        if failure is None and int(waited.result()) < cast(ReplicaAcks, self._acks).acks:
            # Too few replicas in time: the writes are on the primary; the replies still
            # go out (waiting longer would stall every caller), and the count shows it.
            self._stats.unreplicated += 1
            self._unreplicated()
        for future, reply in held:
            reply_error = reply.exception()  # read either way: asyncio logs unread ones
            error = failure or reply_error
            if future.done():  # its caller was cancelled: hand the reply over, if any
                handler = self._late.take(future) if self._late else None
                if handler is not None and error is None:
                    handler(reply.result())
                elif handler is not None and failure is not None:
                    handler(None)  # the connection failed first: whether it ran is unknown
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(reply.result())

    # --- receiving -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self.open = True
        if self._idle_check > 0:
            self._last_write = now = self._loop.time()
            self._idle_timer = self._loop.call_at(now + self._idle_check, self._check_idle)

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
                if isinstance(reply, ReadOnlyError):
                    # The server became a replica (a failover): reconnect to the primary.
                    self._fail(RedisConnectionError, "Redis is a read-only replica now")
                    return
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
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._out.clear()
        self._batches.clear()
        pending, self._pending = self._pending, collections.deque()
        for future, _ in self._held:  # queued this turn, never sent
            pending.append(future)
        self._held = []
        for future in pending:
            if not future.done():
                future.set_exception(kind(message))
            elif self._late:
                # A cancelled caller's script: no reply will come, and whether it ran is
                # unknown; its handler hears so (None) and undoes it idempotently.
                handler = self._late.take(future)
                if handler is not None:
                    handler(None)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()  # nothing more is read from it: late replies are dropped


class RedisMultiplexer:
    """A Redis client that coalesces the commands of concurrent callers (see module doc)."""

    def __init__(
        self,
        where: str | RedisTarget,
        *,
        connect_timeout: float,
        socket_timeout: float,
        decode_responses: bool = True,
        replica_acks: int = 0,
        replica_ack_timeout: float = 0.5,
        address: tuple[str, int] | None = None,
        health_check_interval: float = 0.0,
    ) -> None:
        """``where``: a URL or a parsed target, one server or a Sentinel-watched primary
        (a Cluster's nodes each get one of these, with their ``address``).
        ``health_check_interval``: seconds of idleness after which a connection is sent a
        PING (0: never; the proxy passes ``redis.health_check_interval``)."""
        target = parse_target(where, RedisSettings()) if isinstance(where, str) else where
        if target.kind == "cluster" and address is None:
            raise ValueError("a Redis Cluster needs ClusterMultiplexer")
        self.stats = MultiplexStats()
        self._target = target
        # Sentinel: made once, for the sentinels and each primary it names.
        self._tls = target.tls.context() if target.kind == "sentinel" and target.tls else None
        # Sentinel: the primary's address is asked for on every (re)connect.
        self._endpoint = None if target.kind == "sentinel" else endpoint(target, address)
        self._sentinels = list(target.hosts)
        self._acks = ReplicaAcks(replica_acks, replica_ack_timeout) if replica_acks else None
        # Called for each batch too few replicas confirmed in time (the proxy counts them).
        self.on_unreplicated: Callable[[], None] = _nothing
        self._connect_timeout = connect_timeout
        self._socket_timeout = socket_timeout
        self._health_check_interval = health_check_interval
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

    async def ping(self) -> None:
        """A PING over this client's own connection (opened first if none is): raises as
        ``execute`` does. What the readiness probe asks of the proxy's path to Redis."""
        await self.execute("PING")

    async def execute_asking(self, *args: Arg) -> Any:
        """``execute`` preceded by ASKING on the same connection (a Cluster's ASK
        redirection: the slot is being imported here)."""
        packed = _pack(args)
        connection = self._connection
        if connection is None or not connection.open:
            connection = await self._connect()
        connection.send(_ASKING).add_done_callback(_consume)
        return await connection.send(packed)

    async def run_script(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[Arg],
        when_cancelled: Callable[[Any], None],
        *,
        asking: bool = False,
    ) -> Any:
        """``evalsha``, for a script whose effects must not be lost with its caller: if the
        caller is cancelled after the script was sent, ``when_cancelled`` gets the reply
        when it arrives (nothing for an error reply). When the script was sent and its
        connection failed before the reply (lost, or no reply within socket_timeout),
        cancelled caller or not, the script may have run: ``when_cancelled`` gets None (its
        effects are unknown; the caller undoes them idempotently), and a caller still
        waiting gets the error as usual.

        ``asking``: after a Cluster's ASK redirection; the script goes as EVAL (the node
        importing the slot may not have it cached), preceded by ASKING on the same
        connection, and ``when_cancelled`` holds as well."""
        tail = (len(keys), *keys, *args)
        source: tuple[Arg, ...] = ("EVAL", script.source)
        heads = (source,) if asking else (("EVALSHA", script.sha), source)
        for head in heads:
            connection = self._connection
            if connection is None or not connection.open:
                connection = await self._connect()
            if asking:
                connection.send(_ASKING).add_done_callback(_consume)
            future = connection.send(_pack((*head, *tail)))
            sent = not future.done()  # done already: the connection was closed, not sent
            try:
                return await future
            except NoScriptError:
                continue  # not run: the server lost its script cache; EVAL loads it
            except (RedisConnectionError, RedisTimeoutError):
                if sent:
                    when_cancelled(None)
                raise
            except asyncio.CancelledError:
                if future.cancelled():
                    self._late[future] = lambda reply: (
                        None if isinstance(reply, Exception) else when_cancelled(reply)
                    )
                elif future.done() and future.exception() is None:
                    # The reply was read in the same loop turn as the cancellation, before
                    # this caller resumed: it is here already, and the handler gets it now.
                    when_cancelled(future.result())
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
        """Connect and send AUTH/SELECT, all within connect_timeout. Behind Sentinel, ask
        the sentinels where the primary is first, and make sure it is one (ROLE)."""
        loop = asyncio.get_running_loop()
        where: object = self._endpoint or self._target  # for messages

        def protocol() -> _Connection:
            return _Connection(
                loop,
                self._socket_timeout,
                self._decode,
                self.stats,
                self._late,
                self._acks,
                lambda: self.on_unreplicated(),
                self._health_check_interval,
            )

        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                found = self._endpoint or await self._primary_from_sentinels()
                where = found
                connection = await _open_connection(found, protocol)
                setup = found.setup + ((("ROLE",),) if self._endpoint is None else ())
                replies = await asyncio.gather(
                    *(connection.send(_pack(command)) for command in setup),
                    return_exceptions=True,
                )
                for reply in replies:
                    # A password for a server that has none is let through, as redis-py
                    # does, so both clients accept the same settings.
                    if isinstance(reply, BaseException) and _NO_PASSWORD not in str(reply):
                        raise reply  # AUTH's error first: SELECT fails only because of it
                role = reply_text(cast(list[Any], replies[-1])[0]) if self._endpoint is None else ""
                if role and role != "master":
                    raise RedisConnectionError(
                        f"Redis at {where} is not the primary ({role}): a failover is under way"
                    )
        except BaseException as exc:
            if connection is not None:
                connection.close()
            if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
                raise RedisTimeoutError(
                    f"connecting to Redis at {where} took over {self._connect_timeout:g}s"
                ) from None
            if isinstance(exc, OSError):
                message = f"cannot connect to Redis at {where}: {exc}"
                raise RedisConnectionError(message) from None
            raise
        self.stats.connects += 1
        return connection

    async def _primary_from_sentinels(self) -> _Endpoint:
        """The primary's address, from the first sentinel that knows it.

        Each sentinel gets an equal share of connect_timeout, so one that accepts and
        never answers costs its share, not the whole budget, and the others are asked.
        The one that answered is asked first next time (as redis-py does), and those
        that failed before it go to the back."""
        target = self._target
        sentinel_setup: list[tuple[Arg, ...]] = []
        if target.sentinel_password is not None:
            user, password = target.sentinel_username, target.sentinel_password
            sentinel_setup.append(("AUTH", user, password) if user else ("AUTH", password))
        question = ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", target.service)
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        share = self._connect_timeout / len(self._sentinels)
        for i, address in enumerate(self._sentinels):
            sentinel = _Endpoint(address[0], address[1], None, self._tls, tuple(sentinel_setup))
            connection: _Connection | None = None
            try:
                async with asyncio.timeout(share):
                    connection = await _open_connection(
                        sentinel,
                        lambda: _Connection(
                            loop, self._socket_timeout, True, MultiplexStats(), _LateReplies()
                        ),
                    )
                    for command in sentinel.setup:
                        await connection.send(_pack(command))
                    reply = await connection.send(_pack(question))
            except (OSError, RedisError) as exc:  # TimeoutError (its share used up) included
                failures.append(f"{address[0]}:{address[1]} ({type(exc).__name__})")
                continue
            finally:
                if connection is not None:
                    connection.close()
            if not reply:
                failures.append(f"{address[0]}:{address[1]} (does not know {target.service!r})")
                continue
            if i:
                self._sentinels = self._sentinels[i:] + self._sentinels[:i]
            return endpoint(target, (reply_text(reply[0]), int(reply[1])), self._tls)
        raise RedisConnectionError(
            f"no sentinel knows the primary {target.service!r}: {', '.join(failures)}"
        )


async def _open_connection(where: _Endpoint, protocol: Callable[[], _Connection]) -> _Connection:
    loop = asyncio.get_running_loop()
    if where.path is not None:
        _, connection = await loop.create_unix_connection(protocol, where.path)
    else:
        transport, connection = await loop.create_connection(
            protocol,
            where.host,
            where.port,
            ssl=where.tls,
            server_hostname=where.host if where.tls else None,
        )
        _keep_alive(transport.get_extra_info("socket"))
    return connection


def _keep_alive(sock: socket.socket | None) -> None:
    """TCP keepalive with short timers (see _KEEPALIVE_IDLE), where the platform has them."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # TCP_KEEPIDLE on Linux, TCP_KEEPALIVE on macOS.
        idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
        for option, value in (
            (idle, _KEEPALIVE_IDLE),
            (getattr(socket, "TCP_KEEPINTVL", None), _KEEPALIVE_INTERVAL),
            (getattr(socket, "TCP_KEEPCNT", None), _KEEPALIVE_COUNT),
        ):
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def reply_text(value: Any) -> str:
    """A reply element as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # ASKING's reply: read, so asyncio does not log it
