"""RedisMultiplexer against real servers: what callers get back, and how writes are batched.

Value and batching tests use the session's server, under this test's key prefix (the
``redis`` fixture deletes everything under it afterwards). AUTH/SELECT and failure tests
start a throwaway server from the packaged binary on a free loopback port (stopped by PID),
or a plain asyncio server that accepts connections and answers late or never.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, DataError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.embedded import server_binary
from gateway.store.multiplex import LuaScript, RedisMultiplexer
from tests.procs import free_port, short_tmpdir

# One server's multiplexer, CLIENT commands and WAIT; a Cluster's is in tests/topology.
pytestmark = pytest.mark.single_server

MARGIN = 0.5  # seconds allowed on top of a timeout for scheduling and process noise


@pytest.fixture
async def mux(redis_url: str, redis: Redis) -> AsyncIterator[RedisMultiplexer]:
    # Depends on ``redis`` so that the prefix cleanup runs after this client is closed.
    client = RedisMultiplexer(redis_url, connect_timeout=5, socket_timeout=5)
    yield client
    await client.close()


# --- a throwaway server ----------------------------------------------------------------------


class Server:
    """A private valkey-server on a free loopback port (and a unix socket), stopped by PID."""

    def __init__(self, root: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.socket = root / "s.sock"
        self.password = password
        self.argv = [
            str(server_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.socket),
            "--dir",
            str(root),
            "--save",
            "",
            "--appendonly",
            "no",
            *(["--requirepass", password] if password else []),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "/0") -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}{path}"

    def client(self, db: int = 0) -> sync_redis.Redis:
        return sync_redis.Redis(
            port=self.port, password=self.password, db=db, socket_timeout=2, decode_responses=True
        )

    def start(self) -> Server:
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(sync_redis.ConnectionError), self.client() as client:
                if client.ping():
                    return self
            assert self.process.poll() is None, "valkey-server exited at start"
            assert time.monotonic() < deadline, "valkey-server did not answer within 10 s"
            time.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        """Stop the server outright (as a crash would) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def server() -> Iterator[Server]:
    with short_tmpdir() as root:
        server = Server(root, password="s3cret-pw")
        try:
            yield server.start()
        finally:
            server.kill()


class FakeRedis:
    """A plain asyncio server that understands only PING.

    Connection N answers ``+LATE`` after ``delays[N]`` seconds (None: never answers); later
    connections answer ``+PONG`` at once. It counts connections opened and closed.
    """

    def __init__(self, delays: list[float | None]) -> None:
        self.delays = delays
        self.connections = 0
        self.closed = 0
        self.server: asyncio.Server | None = None
        self.stopping = asyncio.Event()
        self.handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self) -> FakeRedis:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers[handler] = writer
        number = self.connections
        self.connections += 1
        delay = self.delays[number] if number < len(self.delays) else 0.0
        reply = b"+LATE\r\n" if delay else b"+PONG\r\n"
        buffered = b""
        try:
            while data := await reader.read(65536):
                buffered += data
                count = buffered.count(b"PING\r\n")
                buffered = buffered[buffered.rfind(b"PING\r\n") + 6 :] if count else buffered
                if delay is None:
                    continue
                with contextlib.suppress(TimeoutError):  # sleep, unless the test is over
                    await asyncio.wait_for(self.stopping.wait(), delay)
                writer.write(reply * count)
        except ConnectionError:
            pass
        finally:
            self.closed += 1
            writer.close()
            del self.handlers[handler]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.stopping.set()
        handlers = list(self.handlers.items())
        for _, writer in handlers:
            writer.transport.abort()  # ends each handler's read
        await asyncio.gather(*(handler for handler, _ in handlers))
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def fake_redis(delays: list[float | None]) -> AsyncIterator[FakeRedis]:
    fake = await FakeRedis(delays).start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def certificate() -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1 and its key: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    with short_tmpdir() as root:
        cert, key = root / "cert.pem", root / "key.pem"
        request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        files = ["-keyout", str(key), "-out", str(cert)]
        subprocess.run(["openssl", *request, *subject, *files], check=True, capture_output=True)
        yield cert, key


@contextlib.asynccontextmanager
async def tls_in_front_of(server: Server, cert: Path, key: Path) -> AsyncIterator[int]:
    """A TLS listener that forwards to ``server``: its port.

    The packaged server is built without TLS, so this stands in for a TLS-enabled Redis.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    listener = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=context)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


async def _outcome(call: Any) -> tuple[Any, float]:
    """(the call's result or exception, seconds it took)."""
    started = time.monotonic()
    try:
        result = await call
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


async def _written(client: RedisMultiplexer, commands: int) -> None:
    """Wait (up to 5 s) until ``commands`` commands have gone out on the socket."""
    for _ in range(500):
        if client.stats.commands >= commands:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {client.stats.commands} of {commands} commands written")


# --- values ----------------------------------------------------------------------------------


async def test_replies_arrive_as_python_values_and_an_error_fails_only_its_caller(
    mux: RedisMultiplexer, key_prefix: str
) -> None:
    k = key_prefix
    await mux.execute("SET", f"{k}text", "héllo")
    await mux.execute("RPUSH", f"{k}list", "a", b"b", 3, 1.5)
    before = mux.stats.writes

    replies = await asyncio.gather(
        mux.execute("GET", f"{k}text"),
        mux.execute("INCR", f"{k}text"),  # not an integer: an error reply
        mux.execute("INCRBY", f"{k}n", 41),
        mux.execute("GET", f"{k}missing"),
        mux.execute("LRANGE", f"{k}list", 0, -1),
        mux.execute("NOSUCHCOMMAND"),
        mux.execute("PING"),
        return_exceptions=True,
    )

    assert mux.stats.writes == before + 1  # the whole batch, one write
    text, not_int, counter, missing, items, unknown, pong = replies
    assert (text, counter, missing, items, pong) == (
        "héllo",
        41,
        None,
        ["a", "b", "3", "1.5"],
        "PONG",
    )
    assert isinstance(not_int, ResponseError)
    assert "not an integer" in str(not_int)
    assert isinstance(unknown, ResponseError)
    assert "unknown command" in str(unknown)


async def test_raw_mode_returns_bytes_exactly_and_text_mode_rejects_only_bad_text(
    redis_url: str, redis: Redis, key_prefix: str
) -> None:
    raw = RedisMultiplexer(redis_url, connect_timeout=5, socket_timeout=5, decode_responses=False)
    text = RedisMultiplexer(redis_url, connect_timeout=5, socket_timeout=5)
    blob = bytes(range(256))
    try:
        await raw.execute("SET", f"{key_prefix}blob", blob)
        assert await raw.execute("GET", f"{key_prefix}blob") == blob

        bad, good = await asyncio.gather(
            text.execute("GET", f"{key_prefix}blob"),
            text.execute("ECHO", "still in step"),
            return_exceptions=True,
        )
        assert isinstance(bad, DataError)
        assert good == "still in step"
    finally:
        await raw.close()
        await text.close()


async def test_a_command_without_a_name_or_with_a_bad_argument_is_refused_before_sending(
    mux: RedisMultiplexer,
) -> None:
    with pytest.raises(DataError):
        await mux.execute()
    with pytest.raises(DataError):
        await mux.execute("SET", "k", None)  # type: ignore[arg-type]
    assert mux.stats.commands == 0
    assert await mux.execute("PING") == "PONG"


# --- batching --------------------------------------------------------------------------------


async def test_a_thousand_concurrent_calls_share_one_connection_and_one_write(
    mux: RedisMultiplexer, redis: Redis, key_prefix: str
) -> None:
    keys = [f"{key_prefix}n{i}" for i in range(1000)]

    values = await asyncio.gather(*(mux.execute("INCRBY", key, i) for i, key in enumerate(keys)))

    assert values == list(range(1000))  # every caller got its own reply
    assert (mux.stats.connects, mux.stats.writes, mux.stats.commands) == (1, 1, 1000)
    assert await redis.mget(keys[:3] + keys[-1:]) == ["0", "1", "2", "999"]


async def test_pipelining_keeps_writing_while_earlier_replies_are_outstanding(
    mux: RedisMultiplexer, key_prefix: str
) -> None:
    async def caller(i: int) -> list[int]:
        # Each caller's next command goes out in a later turn, before other replies are in.
        return [await mux.execute("INCR", f"{key_prefix}c{i}") for _ in range(20)]

    results = await asyncio.gather(*(caller(i) for i in range(50)))

    assert results == [list(range(1, 21))] * 50
    assert mux.stats.commands == 1000
    assert mux.stats.writes < 200  # batched across callers, far fewer than 1000 writes


# --- scripts ---------------------------------------------------------------------------------


async def test_evalsha_runs_and_runs_again_after_the_script_cache_is_flushed(
    server: Server,
) -> None:
    # A throwaway server: SCRIPT FLUSH on the session's would hit other clients' scripts.
    script = LuaScript.from_source("return {redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[2]}")
    client = RedisMultiplexer(server.url(), connect_timeout=2, socket_timeout=2)
    try:
        with server.client() as check:
            assert check.script_exists(script.sha) == [False]
            # First call: NOSCRIPT, then EVAL, which also caches the script.
            assert await client.evalsha(script, ["n"], [5, "first"]) == [5, "first"]
            assert check.script_exists(script.sha) == [True]
            assert await client.evalsha(script, ["n"], [1, "second"]) == [6, "second"]

            check.script_flush()  # what a server restart does to the cache
            calls = (client.evalsha(script, ["n"], [1, "x"]) for _ in range(10))
            results = await asyncio.gather(*calls)

            assert sorted(r[0] for r in results) == list(range(7, 17))
            assert check.get("n") == "16"
    finally:
        await client.close()


async def test_a_script_error_is_raised_to_its_caller(mux: RedisMultiplexer) -> None:
    script = LuaScript.from_source("return redis.error_reply('KGT custom failure')")
    with pytest.raises(ResponseError, match="KGT custom failure"):
        await mux.evalsha(script, [], [])


# --- connecting ------------------------------------------------------------------------------


async def test_auth_and_select_come_from_the_url(server: Server) -> None:
    urls = {
        3: server.url("/3"),
        4: f"redis://default:{server.password}@127.0.0.1:{server.port}/4",
        5: f"unix://:{server.password}@{server.socket}?db=5",
    }
    for db, url in urls.items():
        client = RedisMultiplexer(url, connect_timeout=2, socket_timeout=2)
        try:
            await client.execute("SET", "where", f"db{db}")
        finally:
            await client.close()

    for db in urls:
        with server.client(db) as check:
            assert check.get("where") == f"db{db}"
    with server.client(0) as check:
        assert check.get("where") is None


async def test_rediss_urls_speak_tls_and_verify_the_certificate(
    server: Server, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    async with tls_in_front_of(server, cert, key) as port:
        base = f"rediss://:{server.password}@127.0.0.1:{port}/6"
        for url in (f"{base}?ssl_ca_certs={cert}", f"{base}?ssl_cert_reqs=none"):
            client = RedisMultiplexer(url, connect_timeout=2, socket_timeout=2)
            try:
                assert await client.execute("INCR", "tls") >= 1
            finally:
                await client.close()

        untrusted = RedisMultiplexer(base, connect_timeout=2, socket_timeout=2)
        try:
            with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.execute("PING")
        finally:
            await untrusted.close()

    with server.client(6) as check:
        assert check.get("tls") == "2"


async def test_a_wrong_password_fails_the_call_and_the_next_call_tries_again(
    server: Server,
) -> None:
    client = RedisMultiplexer(
        f"redis://:wrong@127.0.0.1:{server.port}/0", connect_timeout=2, socket_timeout=2
    )
    try:
        for _ in range(2):
            with pytest.raises(AuthenticationError):
                await client.execute("PING")
        assert client.stats.connects == 0
    finally:
        await client.close()


async def test_concurrent_first_calls_share_one_connection_attempt() -> None:
    async with fake_redis([]) as fake:
        client = RedisMultiplexer(fake.url, connect_timeout=2, socket_timeout=2)
        try:
            replies = await asyncio.gather(*(client.execute("PING") for _ in range(50)))
        finally:
            await client.close()
    assert replies == ["PONG"] * 50
    assert fake.connections == 1


# --- failures --------------------------------------------------------------------------------


async def test_silent_server_times_out_all_calls_and_the_next_call_reconnects() -> None:
    async with fake_redis([None, None]) as fake:
        client = RedisMultiplexer(fake.url, connect_timeout=1, socket_timeout=0.3)
        try:
            outcomes = await asyncio.gather(*(_outcome(client.execute("PING")) for _ in range(5)))
            assert all(isinstance(error, RedisTimeoutError) for error, _ in outcomes)
            assert all(took < 0.3 + MARGIN for _, took in outcomes)
            assert client.stats.timeouts == 1

            error, took = await _outcome(client.execute("PING"))
            assert isinstance(error, RedisTimeoutError)
            assert took < 0.3 + MARGIN
            assert fake.connections == 2  # the broken connection was dropped, a new one made
        finally:
            await client.close()


async def test_a_late_reply_never_reaches_a_later_caller() -> None:
    async with fake_redis([1.0]) as fake:  # first connection answers after 1 s
        client = RedisMultiplexer(fake.url, connect_timeout=1, socket_timeout=0.3)
        try:
            with pytest.raises(RedisTimeoutError):
                await client.execute("PING")
            assert await client.execute("PING") == "PONG"  # a new connection's own reply
            await asyncio.sleep(1.0)  # past the moment the first connection would answer
            assert await client.execute("PING") == "PONG"
            assert fake.connections == 2
        finally:
            await client.close()


async def test_connecting_is_bounded_by_connect_timeout() -> None:
    async with fake_redis([None]) as fake:
        # The server accepts but never answers AUTH: connecting must give up in time.
        url = fake.url.replace("redis://", "redis://:pw@")
        client = RedisMultiplexer(url, connect_timeout=0.3, socket_timeout=5)
        try:
            error, took = await _outcome(client.execute("PING"))
        finally:
            await client.close()
    assert isinstance(error, RedisTimeoutError)
    assert took < 0.3 + MARGIN


async def test_a_frozen_server_times_out_and_a_killed_one_fails_fast_until_it_is_back(
    server: Server,
) -> None:
    client = RedisMultiplexer(server.url(), connect_timeout=1, socket_timeout=0.5)
    try:
        assert await client.execute("SET", "k", "v") == "OK"
        server.signal(signal.SIGSTOP)  # reads nothing, answers nothing
        outcomes = await asyncio.gather(*(_outcome(client.execute("GET", "k")) for _ in range(20)))
        assert all(isinstance(error, RedisTimeoutError) for error, _ in outcomes)
        assert all(took < 0.5 + MARGIN for _, took in outcomes)

        server.kill()
        for _ in range(3):
            error, took = await _outcome(client.execute("GET", "k"))
            assert isinstance(error, RedisConnectionError)
            assert took < 1 + MARGIN

        await asyncio.to_thread(server.start)  # same port, empty data
        started = time.monotonic()
        while True:
            error, _ = await _outcome(client.execute("PING"))
            if error == "PONG":
                break
            assert time.monotonic() - started < 2, f"still failing after 2 s: {error!r}"
            await asyncio.sleep(0.05)
        assert client.stats.connects == 2
    finally:
        await client.close()


async def test_a_connection_lost_mid_call_fails_its_calls_with_connection_error(
    server: Server,
) -> None:
    client = RedisMultiplexer(server.url(), connect_timeout=1, socket_timeout=5)
    try:
        await client.execute("PING")
        server.signal(signal.SIGSTOP)
        calls = [asyncio.create_task(_outcome(client.execute("PING"))) for _ in range(10)]
        await _written(client, 12)  # AUTH + PING + these ten
        server.kill()  # the kernel closes its sockets: calls in flight are lost
        outcomes = await asyncio.gather(*calls)
    finally:
        await client.close()
    assert all(isinstance(error, RedisConnectionError) for error, _ in outcomes)
    assert all(took < 1 for _, took in outcomes)


async def test_close_fails_calls_in_flight_and_every_later_call() -> None:
    async with fake_redis([None]) as fake:
        client = RedisMultiplexer(fake.url, connect_timeout=1, socket_timeout=5)
        call = asyncio.create_task(_outcome(client.execute("PING")))
        await _written(client, 1)
        await client.close()
        error, took = await call
        assert isinstance(error, RedisConnectionError)
        assert took < 1
        with pytest.raises(RedisConnectionError):
            await client.execute("PING")
        await asyncio.sleep(0.05)
        assert fake.closed == 1


# --- cancellation ----------------------------------------------------------------------------


async def test_cancelled_callers_do_not_shift_anyone_elses_reply(server: Server) -> None:
    client = RedisMultiplexer(server.url(), connect_timeout=1, socket_timeout=5)
    try:
        await client.execute("PING")
        # Cancelled before the write (same turn) ...
        queued = [asyncio.create_task(client.execute("INCRBY", f"q{i}", i)) for i in range(30)]
        await asyncio.sleep(0)
        for task in queued[::3]:
            task.cancel()
        # ... and cancelled while the server holds the request (frozen: replies wait).
        server.signal(signal.SIGSTOP)
        sent = [asyncio.create_task(client.execute("INCRBY", f"s{i}", i)) for i in range(30)]
        await _written(client, 2 + 30 + 30)
        for task in sent[1::3]:
            task.cancel()
        server.signal(signal.SIGCONT)

        await asyncio.wait(queued + sent)
    finally:
        await client.close()

    for tasks in (queued, sent):
        for i, task in enumerate(tasks):
            assert task.cancelled() or task.result() == i
        assert sum(task.cancelled() for task in tasks) == 10
    with server.client() as check:  # cancelled calls still ran: only their replies were dropped
        assert check.get("q3") == "3"
        assert check.get("s4") == "4"
