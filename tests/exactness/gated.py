"""An upstream that holds requests until told to answer, and counts them in flight.

- ``/hold?gate=G``: waits until gate ``G`` is opened, then 200 ``{"ok": true}``.
- ``/open?gate=G``: opens gate ``G`` (every request held there answers; later ones pass).
- ``/ws``: a WebSocket that echoes text messages.
- ``/stats``: ``{"current": requests held now, "max": the most ever held at once,
  "total": requests seen on /hold}``.

Run alone (for gateway processes in tests): ``python -m tests.exactness.gated PORT``.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

GATES = web.AppKey("gates", dict[str, asyncio.Event])
COUNTS = web.AppKey("counts", dict[str, int])


def _gate(request: web.Request) -> asyncio.Event:
    return request.app[GATES].setdefault(request.query.get("gate", ""), asyncio.Event())


async def hold(request: web.Request) -> web.Response:
    await request.read()
    counts = request.app[COUNTS]
    counts["total"] += 1
    counts["current"] += 1
    counts["max"] = max(counts["max"], counts["current"])
    try:
        await _gate(request).wait()
    finally:
        counts["current"] -= 1
    return web.json_response({"ok": True})


async def open_gate(request: web.Request) -> web.Response:
    _gate(request).set()
    return web.json_response({"ok": True})


async def echo_socket(request: web.Request) -> web.WebSocketResponse:
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    async for message in socket:
        if message.type == web.WSMsgType.TEXT:
            await socket.send_str(message.data)
    return socket


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


def build_app() -> web.Application:
    app = web.Application()
    app[GATES] = {}
    app[COUNTS] = {"current": 0, "max": 0, "total": 0}
    app.router.add_route("*", "/hold", hold)
    app.router.add_get("/open", open_gate)
    app.router.add_get("/stats", stats)
    app.router.add_get("/ws", echo_socket)
    return app


if __name__ == "__main__":
    web.run_app(build_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
