"""WebSocket upgrades are proxied on routes that allow them, with the key checked at the
handshake."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from redis.asyncio import Redis

from gateway.app import build_proxy, proxy_server
from gateway.config.load import build
from gateway.store.cluster_multiplex import multiplexer_for
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    Gateway,
    ServeApp,
    ServeRaw,
    StartGateway,
    read_request_head,
)


async def _echo_socket(request: web.Request) -> web.WebSocketResponse:
    socket = web.WebSocketResponse(protocols=("chat.v1",))
    await socket.prepare(request)
    await socket.send_json(
        {
            "key_id": request.headers.get("X-Keygate-Key-Id"),
            "authorization": request.headers.get("Authorization"),
        }
    )
    async for message in socket:
        if message.type is WSMsgType.TEXT:
            await socket.send_str(f"echo:{message.data}")
        elif message.type is WSMsgType.BINARY:
            await socket.send_bytes(message.data[::-1])
    return socket


async def _start(handler: Any) -> tuple[web.BaseRunner, int]:
    runner: web.BaseRunner = (
        web.AppRunner(handler)
        if isinstance(handler, web.Application)
        else web.ServerRunner(handler)
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def ws_gateway(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/ws", _echo_socket)
    upstream, upstream_port = await _start(app)
    settings = build(
        {
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "upstreams": {"up": {"url": f"http://127.0.0.1:{upstream_port}"}},
            "routes": [
                {
                    "name": "live",
                    "path": "/ws",
                    "upstream": "up",
                    "scopes": ["live:read"],
                    "websocket": True,
                },
                {"name": "plain", "path": "/plain-ws", "upstream": "up", "rewrite": "/ws"},
            ],
        },
        tmp_path,
    )
    mux = multiplexer_for(settings.redis, redis_url)
    proxy = build_proxy(settings, mux)
    await proxy.start()
    gateway, port = await _start(proxy_server(proxy))
    yield port
    await gateway.cleanup()
    await proxy.close()
    await mux.close()
    await upstream.cleanup()


async def test_websocket_messages_flow_both_ways_with_identity(
    ws_gateway: int, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=["live:read"])
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(
            f"http://127.0.0.1:{ws_gateway}/ws",
            protocols=("chat.v1",),
            headers={"Authorization": f"Bearer {issued.secret}"},
        ) as socket,
    ):
        assert socket.protocol == "chat.v1"
        hello = await socket.receive_json(timeout=5)
        assert hello == {"key_id": issued.record.id, "authorization": None}
        await socket.send_str("ping")
        assert (await socket.receive(timeout=5)).data == "echo:ping"
        await socket.send_bytes(b"\x01\x02\x03")
        assert (await socket.receive(timeout=5)).data == b"\x03\x02\x01"


@pytest.mark.parametrize(
    ("scopes", "secret_ok", "status"),
    [
        (["live:read"], False, 401),
        (["other:read"], True, 403),
    ],
)
async def test_the_handshake_is_refused_without_a_valid_key_or_scope(
    ws_gateway: int, make_key: MakeKey, scopes: list[str], secret_ok: bool, status: int
) -> None:
    issued = await make_key(scopes=scopes)
    secret = issued.secret if secret_ok else "not-a-key-at-all"
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(
                f"http://127.0.0.1:{ws_gateway}/ws", headers={"Authorization": f"Bearer {secret}"}
            )
        assert refused.value.status == status


async def test_routes_without_websocket_do_not_upgrade(ws_gateway: int, make_key: MakeKey) -> None:
    issued = await make_key()
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect(
                f"http://127.0.0.1:{ws_gateway}/plain-ws",
                headers={"Authorization": f"Bearer {issued.secret}"},
            )


# --- settled like any request; the handshake is bounded ----------------------------------------


async def _refusing_socket(request: web.Request) -> web.Response:
    return web.Response(status=403, text="no sockets for you")


@pytest.fixture
async def metered_ws_gateway(
    start_gateway: StartGateway, serve_app: ServeApp, serve_raw: ServeRaw
) -> Gateway:
    """Three WebSocket routes costing 0.25 each: a working upstream socket, an upstream that
    refuses the handshake (403), and one that reads the handshake and never answers."""
    app = web.Application()
    app.router.add_get("/ws", _echo_socket)
    app.router.add_get("/refuse", _refusing_socket)
    working = await serve_app(app)

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await asyncio.sleep(30)

    hung = await serve_raw(hang)
    fixed = {"cost": {"fixed": 0.25}, "websocket": True}
    return await start_gateway(
        upstreams={
            "ws": {"url": f"http://127.0.0.1:{working}"},
            "ws_hung": {
                "url": f"http://127.0.0.1:{hung}",
                "timeouts": {"connect": 1, "read": 0.5, "total": 5},
            },
        },
        routes=[
            {"name": "ws_ok", "path": "/ws", "upstream": "ws", **fixed},
            {"name": "ws_no", "path": "/ws-no", "upstream": "ws", "rewrite": "/refuse", **fixed},
            {"name": "ws_hung", "path": "/ws-hung", "upstream": "ws_hung", **fixed},
        ],
    )


async def _usage(redis: Redis, key_prefix: str, key_id: str) -> tuple[int, int]:
    total = int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)
    uses = int(await redis.hget(f"{key_prefix}k:{{{key_id}}}", "total_uses") or 0)
    return total, uses


async def test_a_websocket_session_is_charged_its_cost_once(
    metered_ws_gateway: Gateway, make_key: MakeKey, redis: Redis, key_prefix: str
) -> None:
    issued = await make_key()
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"{metered_ws_gateway.url}/ws", headers=bearer(issued.secret)) as socket,
    ):
        await socket.receive_json(timeout=5)
        await socket.send_str("ping")
        assert (await socket.receive(timeout=5)).data == "echo:ping"
    await metered_ws_gateway.proxy.settlements.drain()
    assert await _usage(redis, key_prefix, issued.record.id) == (250_000, 1)


async def test_a_handshake_the_upstream_refuses_is_a_502_and_refunded(
    metered_ws_gateway: Gateway, make_key: MakeKey, redis: Redis, key_prefix: str
) -> None:
    issued = await make_key()
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(
                f"{metered_ws_gateway.url}/ws-no", headers=bearer(issued.secret)
            )
    assert refused.value.status == 502
    await metered_ws_gateway.proxy.settlements.drain()
    assert await _usage(redis, key_prefix, issued.record.id) == (0, 1)


async def test_a_handshake_the_upstream_never_answers_is_a_504_and_refunded(
    metered_ws_gateway: Gateway, make_key: MakeKey, redis: Redis, key_prefix: str
) -> None:
    issued = await make_key()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(
                f"{metered_ws_gateway.url}/ws-hung", headers=bearer(issued.secret)
            )
    assert refused.value.status == 504
    await metered_ws_gateway.proxy.settlements.drain()
    assert await _usage(redis, key_prefix, issued.record.id) == (0, 1)
