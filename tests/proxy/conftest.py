"""Fixtures for the proxy tests: a real upstream, purpose-built misbehaving upstreams, and a
keygate proxy built in-process against the session's real Redis.

- ``upstream``: the packaged demo upstream (``gateway.demo.upstream``) on a random port, with
  a record of every request that reached it (``upstream.hits``), so a test can prove that a
  request was, or was never, forwarded.
- ``start_gateway(...)``: a keygate proxy listener on a random loopback port, configured with
  ``ROUTES`` (plus any routes, upstreams, ``keys`` or ``redis`` settings a test adds); every
  one started is stopped at teardown. ``gateway`` is the default one.
- ``serve_app`` / ``serve_raw``: tiny upstreams written for one test (an aiohttp app, or a
  raw asyncio socket server that can send exact bytes, truncate, reset).
- ``raw_http``: one request with an exact request line, because HTTP clients normalise paths.

Keys come from the root conftest's ``make_key`` / ``store``, under the same ``key_prefix``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.app import build_proxy, proxy_server
from gateway.config.load import build
from gateway.config.model import Settings
from gateway.demo.upstream import build_upstream_app
from gateway.proxy.service import Proxy
from gateway.store.clock import ClockOverride, server_clock
from gateway.store.cluster_multiplex import Multiplexer, multiplexer_for
from gateway.store.keystore import KeyStore
from gateway.store.secrets import BASE62
from tests.costs import build_cost_app
from tests.procs import free_port

LOOPBACK = "127.0.0.1"
ECHO_SCOPES = ("echo:read", "echo:write")

# The routes every gateway in these tests has. ``demo`` is the real upstream; ``tight`` is
# the same server behind small timeouts; ``dead`` is a loopback port nothing listens on.
ROUTES: list[dict[str, Any]] = [
    {
        "name": "chat",
        "path": "/v1/chat/completions",
        "upstream": "demo",
        "methods": ["POST"],
        "scopes": ["chat:invoke"],
        "resource": {"json": "model"},
        "error_format": "openai",
    },
    {
        "name": "models",
        "path": "/v1/models",
        "upstream": "demo",
        "methods": ["GET"],
        "scopes": ["models:read"],
        "error_format": "openai",
    },
    # Per-method scopes on a prefix route: reading needs echo:read, anything else echo:write.
    {
        "name": "echo",
        "prefix": "/echo",
        "upstream": "demo",
        "scopes": {"GET": ["echo:read"], "*": ["echo:write"]},
    },
    {"name": "open", "prefix": "/open", "upstream": "demo", "rewrite": "/echo/open"},
    {
        "name": "infer",
        "path": "/infer",
        "upstream": "demo",
        "methods": ["POST"],
        "rewrite": "/echo/infer",
        "resource": {"json": "model", "max_body_bytes": 4096},
    },
    {
        "name": "search",
        "path": "/search",
        "upstream": "demo",
        "methods": ["GET"],
        "rewrite": "/echo/search",
        "resource": {"query": "model"},
    },
    {
        "name": "deployments",
        "prefix": "/deployments",
        "upstream": "demo",
        "rewrite": "/echo/deployments",
        "resource": {"path_segment": 1},
    },
    {"name": "svc", "prefix": "/svc", "upstream": "demo", "strip_prefix": True},
    {
        "name": "hello",
        "path": "/hello",
        "upstream": "demo",
        "methods": ["GET"],
        "rewrite": "/echo/greeting",
    },
    {"name": "tight", "prefix": "/tight", "upstream": "tight", "strip_prefix": True},
    {"name": "dead", "prefix": "/dead", "upstream": "dead"},
]


# --- the real upstream -----------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    method: str
    raw_path: str  # exactly as the request line carried it, query included
    headers: CIMultiDictProxy[str]


@dataclass
class Upstream:
    port: int
    hits: list[Hit] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """The demo upstream on a random port, recording every request that reaches it."""
    hits: list[Hit] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        hits.append(Hit(request.method, request.raw_path, request.headers))
        response: web.StreamResponse = await handler(request)
        return response

    app = build_upstream_app()
    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    found = Upstream(int(runner.addresses[0][1]), hits)
    yield found
    await runner.cleanup()


# --- purpose-built upstreams -----------------------------------------------------------------

ServeApp = Callable[..., Awaitable[int]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ServeRaw = Callable[[RawHandler], Awaitable[int]]


@pytest.fixture
async def serve_app() -> AsyncIterator[ServeApp]:
    """``port = await serve_app(app_or_low_level_handler, **runner_options)``."""
    runners: list[web.BaseRunner] = []

    async def serve(target: web.Application | Any, **options: Any) -> int:
        options.setdefault("shutdown_timeout", 0.5)
        runner: web.BaseRunner = (
            web.AppRunner(target, access_log=None, **options)
            if isinstance(target, web.Application)
            else web.ServerRunner(web.Server(target), **options)
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, LOOPBACK, 0).start()
        return int(runner.addresses[0][1])

    yield serve
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def serve_raw() -> AsyncIterator[ServeRaw]:
    """``port = await serve_raw(handler)``: a socket server whose handler writes exact bytes."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(handler: RawHandler) -> int:
        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()

        server = await asyncio.start_server(on_connection, LOOPBACK, 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield serve
    for writer in writers:
        writer.transport.abort()
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    """One request's head (a raw upstream never gets a body in these tests)."""
    return await reader.readuntil(b"\r\n\r\n")


# --- the gateway under test ------------------------------------------------------------------


@dataclass
class Gateway:
    proxy: Proxy
    mux: Multiplexer
    settings: Settings
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(
    redis_url: str, key_prefix: str, upstream: Upstream, tmp_path: Path, store: KeyStore
) -> AsyncIterator[StartGateway]:
    """``await start_gateway(keys=..., redis=..., routes=[...], upstreams={...}, clock=...)``.

    ``routes`` come before ``ROUTES``; ``redis`` entries override the session server's URL
    and the test's key prefix; any other keyword is a top-level config section.
    """
    started: list[tuple[web.ServerRunner, Proxy, Multiplexer]] = []

    async def start(
        *,
        keys: dict[str, Any] | None = None,
        redis: dict[str, Any] | None = None,
        routes: list[dict[str, Any]] | None = None,
        upstreams: dict[str, Any] | None = None,
        clock: ClockOverride = server_clock,
        dialects: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        **sections: Any,
    ) -> Gateway:
        raw = {
            "redis": {
                "url": redis_url,
                "key_prefix": key_prefix,
                "connect_timeout": 1.0,
                "socket_timeout": 1.0,
                **(redis or {}),
            },
            "keys": keys or {},
            "upstreams": {
                "demo": {"url": upstream.url, "timeouts": {"connect": 1, "read": 10, "total": 30}},
                "tight": {
                    "url": upstream.url,
                    "timeouts": {"connect": 1, "read": 0.3, "total": 5},
                },
                "dead": {"url": f"http://{LOOPBACK}:{free_port()}"},
                **(upstreams or {}),
            },
            "routes": [*(routes or []), *ROUTES],
            "dialects": dialects or {},
            "metrics": metrics or {},
            **sections,  # any other top-level config section, as gateway.yaml spells it
        }
        settings = build(raw, tmp_path)
        mux = multiplexer_for(settings.redis, settings.redis.url)
        proxy = build_proxy(settings, mux, clock, store)
        await proxy.start()
        runner = web.ServerRunner(proxy_server(proxy), shutdown_timeout=0.5)
        await runner.setup()
        started.append((runner, proxy, mux))
        await web.TCPSite(runner, LOOPBACK, 0).start()
        return Gateway(proxy, mux, settings, int(runner.addresses[0][1]))

    yield start
    for runner, proxy, mux in reversed(started):
        await runner.cleanup()
        await proxy.close()
        await mux.close()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


# --- helpers -----------------------------------------------------------------------------------


def bad_checksum(secret: str) -> str:
    """The same keygate-shaped secret with its last checksum character changed."""
    last = secret[-1]
    return secret[:-1] + (BASE62[(BASE62.index(last) + 1) % len(BASE62)])


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def assert_problem(
    response: aiohttp.ClientResponse, status: int, code: str
) -> dict[str, Any]:
    """An RFC 9457 problem from keygate itself: status, type, body shape, request id."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    assert response.headers.get("X-Request-Id")
    body: dict[str, Any] = await response.json(content_type=None)
    assert set(body) >= {"type", "title", "status", "detail", "code"}
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:keygate:error:{code}"
    assert "Traceback" not in body["detail"]
    return body


async def assert_openai_error(
    response: aiohttp.ClientResponse, status: int, code: str, kind: str
) -> dict[str, Any]:
    """OpenAI's error shape ``{"error": {message, type, code}}`` on an openai-format route."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert response.headers.get("X-Request-Id")
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == kind
    assert body["error"]["message"]
    return body


async def echoed(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The demo upstream's echo of what reached it (asserts the request went through)."""
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def raw_http(port: int, head: bytes, within: float = 5.0) -> RawResponse:
    """Send ``head`` (request line and headers, exactly as given) and read to EOF.

    The caller's head should carry ``Connection: close``; the body is returned undecoded.
    """
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(within):
            data = await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    header_block, _, body = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return RawResponse(status, headers, body)


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


# --- routes with costs and limits (tests/costs.py is their upstream) --------------------------


def _cost_route(name: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "path": f"/c/{name}", "upstream": "costs", "rewrite": target, **extra}


COST_ROUTES: list[dict[str, Any]] = [
    _cost_route("fixed", "/flat", cost={"fixed": 0.25}),
    _cost_route("header", "/header", cost={"header": "X-Usage-Cost"}, reserve=1.0),
    _cost_route("header0", "/header", cost={"header": "X-Usage-Cost"}),
    _cost_route(
        "json",
        "/json",
        cost={"json": "usage.total_tokens", "per_unit": 0.001},
        error_format="openai",
    ),
    _cost_route("sse", "/sse", cost={"json": "usage.total_tokens", "per_unit": 0.001}, reserve=0.1),
    _cost_route("byok", "/header", cost={"header": "X-Usage-Cost"}, byok=True, reserve=0.5),
    _cost_route("charged", "/header", cost={"fixed": 0.5}, charge_failed=True),
    _cost_route("free", "/flat"),
    _cost_route("limited", "/flat", rate_limit={"requests": 2, "period_seconds": 60}),
    _cost_route("dead_fixed", "/flat", cost={"fixed": 0.25}, upstream="dead"),
]


@pytest.fixture
async def cost_upstream_url(serve_app: ServeApp) -> str:
    port = await serve_app(build_cost_app())
    return f"http://{LOOPBACK}:{port}"


@pytest.fixture
async def start_cost_gateway(
    start_gateway: StartGateway, cost_upstream_url: str
) -> Callable[..., Awaitable[Gateway]]:
    """A gateway with COST_ROUTES in front of tests/costs.py; ``clock=`` as start_gateway."""

    async def start(**options: Any) -> Gateway:
        return await start_gateway(
            routes=COST_ROUTES, upstreams={"costs": {"url": cost_upstream_url}}, **options
        )

    return start


@pytest.fixture
async def cost_gateway(start_cost_gateway: Callable[..., Awaitable[Gateway]]) -> Gateway:
    return await start_cost_gateway()
