"""503 + Retry-After when Redis is unreachable (fail_closed, the default), fast and never
hanging; fail_open lets requests through and counts them; and when Redis comes back the
proxy recovers by itself, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis as sync_redis

from gateway.embedded import server_binary
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames
from gateway.store.secrets import generate
from tests.conftest import MakeKey, bearer
from tests.procs import free_port
from tests.proxy.conftest import (
    ECHO_SCOPES,
    LOOPBACK,
    Gateway,
    ServeRaw,
    StartGateway,
    Upstream,
    assert_openai_error,
    assert_problem,
    bad_checksum,
    echoed,
)

TIMEOUTS = {"connect_timeout": 0.3, "socket_timeout": 0.3}
NEVER_HANGS = 1.0  # seconds: both timeouts plus scheduling noise


async def _timed_get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[aiohttp.ClientResponse, float]:
    started = time.monotonic()
    response = await http.get(url, headers=headers)
    await response.read()
    return response, time.monotonic() - started


# --- fail_closed ---------------------------------------------------------------------------------


def _refused_url() -> str:
    return f"redis://{LOOPBACK}:{free_port()}"


async def _silent_url(serve_raw: ServeRaw) -> str:
    """A TCP server that accepts and reads but never answers: only the reply timeout helps."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    return f"redis://{LOOPBACK}:{await serve_raw(swallow)}"


@contextlib.contextmanager
def _full_backlog() -> Iterator[str]:
    """A listener whose accept queue is full: new connections get no SYN-ACK (connect hangs)."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # more than the queue holds; the extra ones stay pending
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((LOOPBACK, port))
        time.sleep(0.05)
        yield f"redis://{LOOPBACK}:{port}"


@pytest.fixture(params=["refused", "silent", "connect-hangs"])
async def unreachable_redis(
    request: pytest.FixtureRequest, serve_raw: ServeRaw
) -> AsyncIterator[tuple[str, str]]:
    """(kind, url) of a Redis that refuses, never answers, or never completes a connect."""
    if request.param == "refused":
        yield request.param, _refused_url()
    elif request.param == "silent":
        yield request.param, await _silent_url(serve_raw)
    else:
        with _full_backlog() as url:
            yield request.param, url


async def test_unreachable_redis_is_503_with_retry_after_fast(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    unreachable_redis: tuple[str, str],
) -> None:
    kind, url = unreachable_redis
    gateway = await start_gateway(redis={"url": url, **TIMEOUTS})
    headers = bearer(generate("kg_"))
    for _ in range(2):  # the second request must not wait on a broken first attempt
        response, elapsed = await _timed_get(http, f"{gateway.url}/echo/x", headers)
        await assert_problem(response, 503, "store_error")
        assert response.headers["Retry-After"] == "1"
        assert elapsed < NEVER_HANGS, elapsed
    assert upstream.hits == []
    stats = gateway.mux.stats  # which timeout ended it: the connect, or the reply
    if kind == "silent":
        assert stats.connects == 2 and stats.timeouts == 2
    else:
        assert stats.connects == 0


async def test_concurrent_requests_all_get_503_without_piling_up(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    serve_raw: ServeRaw,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await start_gateway(redis={"url": await _silent_url(serve_raw), **TIMEOUTS})
    headers = bearer(generate("kg_"))
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="keygate.proxy"):
        results = await asyncio.gather(
            *(_timed_get(http, f"{gateway.url}/echo/{i}", headers) for i in range(30))
        )
    assert {response.status for response, _ in results} == {503}
    assert time.monotonic() - started < NEVER_HANGS * 2
    # One line for the outage, not one per request: a flood would bury the cause.
    lines = [r.getMessage() for r in caplog.records if "key store unavailable" in r.getMessage()]
    assert lines == [
        "key store unavailable (TimeoutError): 1 requests refused with 503 since the last line"
    ]


async def test_store_error_on_an_openai_route_is_openai_shaped(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(redis={"url": _refused_url(), **TIMEOUTS})
    response = await http.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]},
        headers=bearer(generate("kg_")),
    )
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    body = await response.json()
    assert body["error"]["code"] == "store_error"


# --- fail_open -----------------------------------------------------------------------------------


async def test_fail_open_lets_requests_through_counted_and_without_identity(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: Upstream
) -> None:
    gateway = await start_gateway(
        redis={"url": _refused_url(), "on_error": "fail_open", **TIMEOUTS}
    )
    spoof = {"X-Keygate-Key-Id": "forged", "x-keygate-scopes": "*"}
    for i in range(3):
        echo = await echoed(
            await http.get(f"{gateway.url}/echo/{i}", headers={**bearer(generate("kg_")), **spoof})
        )
        assert not [name for name, _ in echo["header_list"] if name.lower().startswith("x-keygate")]
        assert "Authorization" not in echo["headers"]
    assert _fail_open(gateway) == 3
    # What needs no Redis is still decided: no key, a bad checksum.
    await assert_problem(await http.get(f"{gateway.url}/echo/x"), 401, "missing_key")
    forged = bad_checksum(generate("kg_"))
    await assert_problem(
        await http.get(f"{gateway.url}/echo/x", headers=bearer(forged)), 401, "invalid_key"
    )
    assert _fail_open(gateway) == 3
    assert len(upstream.hits) == 3


async def test_fail_open_with_redis_up_still_enforces_everything(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    gateway = await start_gateway(redis={"on_error": "fail_open"})
    disabled = await make_key(scopes=ECHO_SCOPES, disabled=True)
    await assert_problem(
        await http.get(f"{gateway.url}/echo/x", headers=bearer(disabled.secret)), 403, "disabled"
    )
    await assert_openai_error(
        await http.post(
            f"{gateway.url}/v1/chat/completions", json={}, headers=bearer(generate("kg_"))
        ),
        401,
        "invalid_key",
        "authentication_error",
    )
    assert _fail_open(gateway) == 0


# --- recovery ------------------------------------------------------------------------------------


class ThrowawayRedis:
    """A private valkey-server on a fixed loopback port with append-only persistence, so its
    keys survive a stop and start; stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.argv = [
            str(server_binary()),
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--dir",
            str(root),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}"

    def _answers(self) -> bool:
        client = sync_redis.Redis(port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        except (sync_redis.ConnectionError, sync_redis.TimeoutError, sync_redis.ResponseError):
            return False
        finally:
            client.close()

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.process.returncode is None, "valkey-server exited at start"
            assert time.monotonic() < deadline, "valkey-server did not answer within 10 s"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """SIGTERM (the server flushes its append-only file) and wait for the exit."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 10)


@pytest.fixture
async def throwaway_redis(tmp_path: Path) -> AsyncIterator[ThrowawayRedis]:
    server = ThrowawayRedis(tmp_path / "throwaway")
    await server.start()
    yield server
    if server.process is not None:
        server.process.kill()
        await server.process.wait()


async def test_recovers_without_restart_when_redis_comes_back(
    start_gateway: StartGateway, http: aiohttp.ClientSession, throwaway_redis: ThrowawayRedis
) -> None:
    gateway = await start_gateway(redis={"url": throwaway_redis.url, **TIMEOUTS})
    client = connect(gateway.settings.redis, throwaway_redis.url)
    store = KeyStore(client, KeyNames(gateway.settings.redis.key_prefix), "kg_")
    await store.scripts.load()
    issued = await store.create(
        {"workspace_id": "ws-a", "user_id": str(uuid.uuid4()), "scopes": ECHO_SCOPES}
    )
    await client.aclose()
    url, headers = f"{gateway.url}/echo/x", bearer(issued.secret)

    log: list[tuple[float, int, float]] = []  # (sent at, status, seconds taken)
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            response, elapsed = await _timed_get(http, url, headers)
            log.append((sent, response.status, elapsed))
            await asyncio.sleep(0.02)

    async def first(status: int, after: float, within: float) -> float:
        deadline = time.monotonic() + within
        while not any(s == status and at >= after for at, s, _ in log):
            assert time.monotonic() < deadline, f"no {status} within {within}s: {log[-5:]}"
            await asyncio.sleep(0.01)
        return min(at for at, s, _ in log if s == status and at >= after)

    runner = asyncio.create_task(traffic())
    try:
        await first(200, 0, within=5)
        await throwaway_redis.stop()
        await first(503, time.monotonic(), within=2)
        connects = gateway.mux.stats.connects
        await throwaway_redis.start()
        ready = time.monotonic()
        back = await first(200, ready, within=2)
    finally:
        stop.set()
        await runner
    assert back - ready < 2.0
    assert gateway.mux.stats.connects > connects  # the same client reconnected by itself
    assert {status for _, status, _ in log} == {200, 503}
    assert max(elapsed for _, _, elapsed in log) < NEVER_HANGS


def _fail_open(gateway: Gateway) -> float:
    """What the metric keygate_fail_open_total says."""
    value = gateway.proxy.metrics.registry.get_sample_value("keygate_fail_open_total")
    return value or 0.0
