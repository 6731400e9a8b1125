"""WebSocket pass-through on routes with ``websocket: true``; the key is checked at the
handshake, by the same chain as any request."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web

from gateway.errors import Outcome
from gateway.proxy.context import RequestContext
from gateway.proxy.forward import upstream_url
from gateway.proxy.headers import upstream_request_headers
from gateway.proxy.steps import deny

if TYPE_CHECKING:
    from gateway.proxy.service import Proxy

_HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)


def is_upgrade(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:  # CLOSE, CLOSING, CLOSED, ERROR
            break


async def proxy_websocket(proxy: Proxy, ctx: RequestContext) -> web.StreamResponse:
    assert ctx.match is not None
    request = ctx.request
    headers = upstream_request_headers(
        request.headers,
        drop=(*ctx.credential_headers, *_HANDSHAKE),
        key=ctx.key,
        request_id_value=ctx.request_id,
        client_ip=request.remote,
        scheme=request.scheme,
    )
    protocols = tuple(
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    )
    url = upstream_url(ctx, proxy.settings.keys.query_param if ctx.credential_in_query else None)
    timeouts = ctx.match.upstream.timeouts
    try:
        upstream = await proxy.sessions[ctx.match.upstream.name].ws_connect(
            url,
            headers=headers,
            protocols=protocols,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeouts.connect),
        )
    except TimeoutError:
        return deny(ctx, Outcome.UPSTREAM_TIMEOUT, "the upstream did not answer in time")
    except aiohttp.ClientError:
        return deny(ctx, Outcome.UPSTREAM_ERROR, "the upstream refused the WebSocket")
    client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
    try:
        await client.prepare(request)
        pumps = [
            asyncio.ensure_future(_pump(client, upstream)),
            asyncio.ensure_future(_pump(upstream, client)),
        ]
        _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, ConnectionError):
                await task
    finally:
        await upstream.close()
        await client.close()
    return client
