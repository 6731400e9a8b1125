"""An upstream that states its own cost, for the limits and usage tests.

- ``GET|POST /flat``: 200, no cost stated (routes with a fixed cost).
- ``/header?cost=C&status=S&delay=D``: status S (200), header ``X-Usage-Cost: C`` when
  given, after D seconds.
- ``/json?tokens=N&status=S``: a JSON body ``{"usage": {"total_tokens": N}}``.
- ``/sse?tokens=N&chunks=K&interval=I``: an OpenAI-style stream of K content chunks, I
  seconds apart, then a final chunk with ``usage.total_tokens = N`` and ``[DONE]``.

Run alone (for gateway processes in other tests): ``python -m tests.costs PORT``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


def _number(request: web.Request, name: str, default: float) -> float:
    return float(request.query.get(name, default))


async def flat(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True})


async def header(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(_number(request, "delay", 0))
    headers = {}
    if "cost" in request.query:
        headers["X-Usage-Cost"] = request.query["cost"]
    return web.json_response(
        {"ok": True}, status=int(_number(request, "status", 200)), headers=headers
    )


async def json_body(request: web.Request) -> web.Response:
    await request.read()
    tokens = int(_number(request, "tokens", 0))
    body = {"id": "cmpl-1", "usage": {"prompt_tokens": 1, "total_tokens": tokens}}
    return web.json_response(body, status=int(_number(request, "status", 200)))


async def sse(request: web.Request) -> web.StreamResponse:
    await request.read()
    tokens = int(_number(request, "tokens", 0))
    chunks = int(_number(request, "chunks", 3))
    interval = _number(request, "interval", 0)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(chunks):
        delta = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}}], "usage": None}
        await response.write(f"data: {json.dumps(delta)}\n\n".encode())
        await asyncio.sleep(interval)
    final = {"choices": [], "usage": {"prompt_tokens": 1, "total_tokens": tokens}}
    await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


def build_cost_app() -> web.Application:
    app = web.Application()
    for path, handler in (
        ("/flat", flat),
        ("/header", header),
        ("/json", json_body),
        ("/sse", sse),
    ):
        app.router.add_route("*", path, handler)
    return app


if __name__ == "__main__":
    web.run_app(build_cost_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
