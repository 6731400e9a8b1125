"""Slow and idle clients: a request head dripped byte by byte, connections that send nothing,
idle keep-alive connections, more connections than a process can hold, and a request body
dripped so slowly that it would hold an upstream connection for the whole exchange.

Each is cut off within its configured time (small here: tenths of seconds) and counted in
keygate_client_timeouts_total / keygate_client_connections_refused_total; a legitimate
client, even a slow one whose upload keeps going, is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web

from gateway.admin.app import build_admin_app
from gateway.config.load import ConfigError, build
from gateway.listener import connection_budget, operator_runner
from gateway.proxy.service import Proxy
from gateway.store.keystore import KeyStore
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import LOOPBACK, Gateway, ServeApp, StartGateway, Upstream

SLACK = 1.0  # seconds beyond a configured timeout before a test calls the server late


class Serving(Protocol):
    """A gateway under test: the proxy listener's or the auth listener's."""

    proxy: Proxy


def counted(gateway: Serving, name: str, **labels: str) -> float:
    """One series of the process's metrics, 0 when absent."""
    text = gateway.proxy.metrics.exposition().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it has not
    closed it ``within`` seconds."""
    received = b""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk
    return received


async def drip(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes, interval: float
) -> bytes:
    """Send ``data`` one byte every ``interval`` seconds until the server closes the
    connection; what the server sent meanwhile. Fails if all of ``data`` went out."""
    received = b""
    for byte in data:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return received
        try:
            chunk = await asyncio.wait_for(reader.read(65536), interval)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server took all {len(data)} dripped bytes; it sent {received!r}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response with a Content-Length: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return status, body


def get_head(path: str, secret: str | None) -> bytes:
    auth = f"Authorization: Bearer {secret}\r\n"
    return f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n{auth}\r\n".encode()


async def opened(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LOOPBACK, port)


def close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


# --- the request head ----------------------------------------------------------------------


async def test_a_head_dripped_byte_by_byte_is_cut_off_at_the_header_timeout(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(client={"header_timeout": 0.5})
    reader, writer = await opened(gateway.port)
    started = time.monotonic()
    head = b"GET /hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"k" * 400
    try:
        assert await drip(writer, reader, head, interval=0.05) == b""  # closed, no answer
    finally:
        close(writer)
    assert time.monotonic() - started < 0.5 + SLACK
    assert counted(gateway, "keygate_client_timeouts_total", listener="proxy", phase="head") == 1
    assert upstream.hits == []


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(client={"header_timeout": 0.4, "keepalive_timeout": 30})
    reader, writer = await opened(gateway.port)
    try:
        assert await closed_by_server(reader, within=0.4 + SLACK) == b""
    finally:
        close(writer)


async def test_on_a_kept_alive_connection_the_head_clock_starts_with_its_first_byte(
    start_gateway: StartGateway, make_key: MakeKey
) -> None:
    gateway = await start_gateway(client={"header_timeout": 0.5, "keepalive_timeout": 30})
    key = await make_key()
    reader, writer = await opened(gateway.port)
    try:
        writer.write(get_head("/hello", key.secret))
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(0.8)  # idle longer than header_timeout: keep-alive rules that
        writer.write(get_head("/hello", key.secret))
        assert (await read_response(reader))[0] == 200
        started = time.monotonic()
        assert await drip(writer, reader, get_head("/hello", key.secret), 0.05) == b""
        assert time.monotonic() - started < 0.5 + SLACK  # not keepalive_timeout's 30 s
    finally:
        close(writer)


# --- idle connections ----------------------------------------------------------------------


async def test_an_idle_kept_alive_connection_is_reaped_at_the_keepalive_timeout(
    start_gateway: StartGateway, make_key: MakeKey
) -> None:
    gateway = await start_gateway(client={"keepalive_timeout": 0.4, "header_timeout": 30})
    key = await make_key()
    reader, writer = await opened(gateway.port)
    try:
        writer.write(get_head("/hello", key.secret))
        assert (await read_response(reader))[0] == 200
        assert await closed_by_server(reader, within=0.4 + SLACK) == b""
    finally:
        close(writer)
    assert counted(gateway, "keygate_client_timeouts_total", listener="proxy", phase="idle") == 1


# --- the connection cap --------------------------------------------------------------------


async def test_connections_over_the_cap_are_closed_at_once_and_the_cap_frees_up(
    start_gateway: StartGateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(client={"max_connections": 3, "header_timeout": 30})
    key = await make_key()
    held = [await opened(gateway.port) for _ in range(3)]
    try:
        for reader, writer in held:  # each is accepted, and answered when it asks
            writer.write(get_head("/hello", key.secret))
            assert (await read_response(reader))[0] == 200
        reader, writer = await opened(gateway.port)
        try:
            writer.write(get_head("/hello", key.secret))
            assert await closed_by_server(reader, within=SLACK) == b""  # no answer
        finally:
            close(writer)
        assert counted(gateway, "keygate_client_connections_refused_total", listener="proxy") == 1
        assert counted(gateway, "keygate_client_connections", listener="proxy") == 3
    finally:
        close(held.pop()[1])  # one slot frees
    try:
        status = 0
        async with asyncio.timeout(2 * SLACK):
            while status != 200:  # the server sees the close within a moment
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{gateway.url}/hello", headers=bearer(key.secret)) as r:
                        status = r.status
    finally:
        for _, writer in held:
            close(writer)


def test_the_default_cap_leaves_room_for_upstream_and_redis_sockets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = build(
        {
            "upstreams": {
                "a": {"url": "http://127.0.0.1:9", "pool_size": 100},
                "b": {"url": "http://127.0.0.1:9", "pool_size": 50},
            }
        },
        Path("."),
    )
    cap = connection_budget(settings, descriptors=1024)
    # 1024 less the 150 upstream sockets, the admin listener's 64 and 64 for Redis and files
    assert cap == 1024 - 150 - 64 - 64
    assert connection_budget(settings, descriptors=65536) == 65536 - 150 - 64 - 64
    configured = build({"client": {"max_connections": 10}}, Path("."))
    assert connection_budget(configured, descriptors=1024) == 10
    assert not caplog.records
    too_many = build({"client": {"max_connections": 5000}}, Path("."))
    assert connection_budget(too_many, descriptors=1024) == 5000  # as told, but warned
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "client.max_connections is 5000"
    ]


@pytest.mark.parametrize(
    ("client", "problem"),
    [
        ({"header_timeout": 0}, "client.header_timeout: must be a finite number > 0"),
        ({"keepalive_timeout": -1}, "client.keepalive_timeout: must be a finite number > 0"),
        ({"body_timeout": "soon"}, "client.body_timeout: must be a number"),
        ({"min_upload_rate": -5}, "client.min_upload_rate: must be an integer >= 0"),
        ({"max_connections": 0}, "client.max_connections: must be auto or an integer >= 1"),
        ({"max_connections": "many"}, "client.max_connections: must be auto or an integer >= 1"),
        ({"header_timout": 5}, "client.header_timout: unknown option"),
    ],
)
def test_client_options_are_validated_naming_the_option(
    client: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        build({"client": client}, Path("."))
    assert [p.split(" (got")[0] for p in refused.value.problems] == [problem]


# --- request bodies ------------------------------------------------------------------------

NARROW_ROUTES = [
    {"name": "drip", "prefix": "/drip", "upstream": "narrow", "rewrite": "/echo/drip"},
    {"name": "other", "prefix": "/other", "upstream": "narrow", "rewrite": "/echo/other"},
    {"name": "slow", "prefix": "/slow", "upstream": "narrow", "rewrite": "/echo/slow"},
]


async def narrow_gateway(start_gateway: StartGateway, upstream: Upstream) -> Gateway:
    """Routes on an upstream with one pooled connection: whoever holds it holds them all."""
    narrow = {"url": upstream.url, "pool_size": 1, "timeouts": {"read": 10, "total": 10}}
    return await start_gateway(
        routes=NARROW_ROUTES,
        upstreams={"narrow": narrow},
        client={"body_timeout": 0.5, "min_upload_rate": 100},
    )


async def test_a_dripped_upload_gets_408_and_frees_the_upstream_for_another_tenant(
    start_gateway: StartGateway,
    upstream: Upstream,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await narrow_gateway(start_gateway, upstream)
    dripper = await make_key(workspace_id="ws-dripper")
    tenant = await make_key(workspace_id="ws-tenant")
    reader, writer = await opened(gateway.port)
    head = (
        f"POST /drip HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {dripper.secret}\r\n"
        "Content-Length: 1000\r\n\r\n"
    ).encode()
    writer.write(head)
    dripping = asyncio.create_task(drip(writer, reader, b"x" * 1000, interval=0.1))
    try:
        await asyncio.sleep(0.2)  # its exchange holds the upstream's only connection
        async with asyncio.timeout(0.5 + 2 * SLACK):  # not the dripper's 10 s total timeout
            async with http.get(f"{gateway.url}/other", headers=bearer(tenant.secret)) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["path"] == "/echo/other"
        answer = await asyncio.wait_for(dripping, SLACK)
    finally:
        dripping.cancel()
        close(writer)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert b'"code": "request_timeout"' in answer
    assert counted(gateway, "keygate_client_timeouts_total", listener="proxy", phase="body") == 1


async def test_a_stalled_upload_is_cut_off_once_the_response_has_started(
    start_gateway: StartGateway, serve_app: ServeApp, make_key: MakeKey
) -> None:
    async def answers_at_once(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"started\n")
        await asyncio.sleep(30)  # never reads the body, never ends the answer
        return response

    port = await serve_app(answers_at_once)
    gateway = await start_gateway(
        routes=[{"name": "early", "prefix": "/early", "upstream": "early"}],
        upstreams={"early": {"url": f"http://{LOOPBACK}:{port}"}},
        client={"body_timeout": 0.5},
    )
    key = await make_key()
    reader, writer = await opened(gateway.port)
    try:
        writer.write(
            f"POST /early HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key.secret}\r\n"
            "Content-Length: 100\r\n\r\nsome".encode()
        )
        answer = await closed_by_server(reader, within=0.5 + 2 * SLACK)
    finally:
        close(writer)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"started\n" in answer
    assert not answer.endswith(b"0\r\n\r\n")  # cut off, not ended as if whole
    assert counted(gateway, "keygate_client_timeouts_total", listener="proxy", phase="body") == 1


async def test_a_slow_upload_that_keeps_its_rate_is_served(
    start_gateway: StartGateway, upstream: Upstream, make_key: MakeKey
) -> None:
    gateway = await narrow_gateway(start_gateway, upstream)  # 100 B/s over 0.5 s windows
    key = await make_key()
    body = bytes(range(256)) * 4
    reader, writer = await opened(gateway.port)
    try:
        writer.write(
            f"POST /drip HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key.secret}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        for start in range(0, len(body), 128):  # 1280 B/s, for 0.8 s
            writer.write(body[start : start + 128])
            await writer.drain()
            await asyncio.sleep(0.1)
        status, answer = await read_response(reader)
    finally:
        close(writer)
    assert status == 200, answer
    assert b'"sha256": "' + hashlib.sha256(body).hexdigest().encode() in answer


async def test_an_upload_keygate_is_not_reading_yet_is_not_the_clients_fault(
    start_gateway: StartGateway,
    upstream: Upstream,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await narrow_gateway(start_gateway, upstream)
    key = await make_key()
    body = b"y" * (4 << 20)  # far over what keygate buffers before it stops reading
    holder = asyncio.create_task(
        http.get(f"{gateway.url}/slow?seconds=1.5", headers=bearer(key.secret))
    )
    try:
        await asyncio.sleep(0.2)  # /slow holds the only upstream connection for 1.5 s
        async with http.post(
            f"{gateway.url}/other?discard=1", data=body, headers=bearer(key.secret)
        ) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["sha256"] == hashlib.sha256(body).hexdigest()
        async with await holder as held:
            assert held.status == 200
    finally:
        holder.cancel()
    assert counted(gateway, "keygate_client_timeouts_total", listener="proxy", phase="body") == 0


# --- the admin listener --------------------------------------------------------------------


async def test_the_admin_listener_cuts_off_slow_heads_and_idle_connections(
    gateway: Gateway, store: KeyStore, tmp_path: Path
) -> None:
    settings = build({"client": {"header_timeout": 0.5, "keepalive_timeout": 0.5}}, tmp_path)
    app = build_admin_app(settings, store, gateway.proxy.metrics)
    runner = operator_runner(app, settings, gateway.proxy.metrics, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        port = int(runner.addresses[0][1])
        reader, writer = await opened(port)
        started = time.monotonic()
        try:
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
            assert await drip(writer, reader, head, 0.05) == b""
        finally:
            close(writer)
        assert time.monotonic() - started < 0.5 + SLACK
        reader, writer = await opened(port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            assert await closed_by_server(reader, within=0.5 + SLACK) == b""
        finally:
            close(writer)
    finally:
        await runner.cleanup()
    assert counted(gateway, "keygate_client_timeouts_total", listener="admin", phase="head") == 1
    assert counted(gateway, "keygate_client_timeouts_total", listener="admin", phase="idle") == 1
