"""WebSocket pass-through on routes with ``websocket: true``; the key is checked at the
handshake, by the same chain as any request, and the session is settled like one: the
route's cost is charged once the client has its 101, refunded when the upstream refused or
never answered the handshake."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web

from gateway.errors import Outcome
from gateway.proxy.context import RequestContext
from gateway.proxy.forward import upstream_url
from gateway.proxy.headers import upstream_request_headers
from gateway.proxy.steps import deny

if TYPE_CHECKING:
    from gateway.policies.cost import CostMeter
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


async def proxy_websocket(
    proxy: Proxy, ctx: RequestContext, meter: CostMeter | None
) -> web.StreamResponse:
    """Open the upstream socket, answer the client's handshake, then pump messages both ways
    until either side closes. The handshake is bounded by the upstream's read timeout (and
    its total, if shorter); an open session by neither: it lives as long as both peers do.

    Sets what settling needs: ``ctx.upstream_status`` when the upstream answered the
    handshake, ``ctx.responded`` once the client has its 101."""
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
    name = ctx.match.upstream.name
    sent_at = time.perf_counter()
    try:
        async with asyncio.timeout(min(timeouts.read, timeouts.total)):
            upstream = await proxy.sessions[name].ws_connect(
                url,
                headers=headers,
                protocols=protocols,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeouts.connect),
            )
    except TimeoutError:
        proxy.metrics.upstream_error(name, "timeout")
        return deny(ctx, Outcome.UPSTREAM_TIMEOUT, "the upstream did not answer in time")
    except aiohttp.WSServerHandshakeError as exc:
        ctx.upstream_status = exc.status  # answered, but not with a socket: nothing to charge
        proxy.metrics.upstream_error(name, "invalid")
        return deny(ctx, Outcome.UPSTREAM_ERROR, "the upstream refused the WebSocket")
    except aiohttp.ClientError:
        proxy.metrics.upstream_error(name, "connect")
        return deny(ctx, Outcome.UPSTREAM_ERROR, "the upstream could not be reached")
    finally:
        ctx.upstream_s = time.perf_counter() - sent_at
    ctx.upstream_status = 101
    if meter is not None:
        meter.see_headers(101, {})  # a fixed cost; other rules charge the reservation
    client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
    try:
        await client.prepare(request)
        ctx.responded = True
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
