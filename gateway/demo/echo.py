"""The sample upstream's echo service: tells a test exactly what the gateway forwarded.

- ``/echo`` and ``/echo/{tail}`` (any method): what arrived (method, raw path, query, every
  header, body). ``?discard=1`` answers only the body's size and sha256; bodies are read as a
  stream either way, so a very large upload costs no memory.
- ``/echo/status/{code}``, ``/echo/slow?seconds=S``, ``/echo/stream?chunks=N&interval=S``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

ECHO_BODY_LIMIT = 1 << 20
"""Bytes of a request body kept for the echo; larger bodies are counted and hashed only."""
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class _Body:
    size: int
    sha256: str
    kept: bytes


async def _read_body(request: web.Request, keep: int) -> _Body:
    """Consume the request body chunk by chunk, keeping at most ``keep`` bytes of it."""
    digest = hashlib.sha256()
    size = 0
    kept = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
    return _Body(size, digest.hexdigest(), bytes(kept))


def _bad_query(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _query_number(request: web.Request, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad_query(f"{name} must be a number") from None
    if not (math.isfinite(value) and 0 <= value <= high):
        raise _bad_query(f"{name} must be between 0 and {high:g}")
    return value


def _query_view(request: web.Request) -> dict[str, str | list[str]]:
    """Each query parameter's value; a list only when the parameter is repeated."""
    view: dict[str, str | list[str]] = {}
    for name in request.query:
        values = request.query.getall(name)
        view[name] = values[0] if len(values) == 1 else values
    return view


async def _echo_payload(request: web.Request) -> dict[str, Any]:
    """What arrived, for the echo; with ``?discard=1`` only the body's size and sha256."""
    if request.query.get("discard") == "1":
        body = await _read_body(request, keep=0)
        return {"body_bytes": body.size, "sha256": body.sha256}
    body = await _read_body(request, keep=ECHO_BODY_LIMIT)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return {
        "method": request.method,
        "path": request.raw_path.partition("?")[0],
        "query": _query_view(request),
        "headers": headers,
        "header_list": [[name, value] for name, value in request.headers.items()],
        "body": body.kept.decode("utf-8", errors="replace") if body.size else None,
        "body_bytes": body.size,
        "body_truncated": body.size > len(body.kept),
        "sha256": body.sha256,
    }


async def echo(request: web.Request) -> web.Response:
    """200 with what arrived; see the module docstring."""
    return web.json_response(await _echo_payload(request))


async def echo_status(request: web.Request) -> web.Response:
    """The echo, answered with the status named in the path (200-599)."""
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise _bad_query("status must be between 200 and 599")
    payload = await _echo_payload(request)
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code, **payload}, status=code)


async def echo_slow(request: web.Request) -> web.Response:
    """The echo, answered after ``?seconds=S`` (default 1, at most 30)."""
    seconds = _query_number(request, "seconds", 1.0, 30.0)
    payload = await _echo_payload(request)
    await asyncio.sleep(seconds)
    return web.json_response({"slept": seconds, **payload})


async def echo_stream(request: web.Request) -> web.StreamResponse:
    """``?chunks=N`` chunked lines ``chunk <i>\\n``, ``?interval=S`` seconds apart."""
    chunks = _query_number(request, "chunks", 5, 10_000)
    interval = _query_number(request, "interval", 0.1, 30.0)
    if chunks != int(chunks):
        raise _bad_query("chunks must be a whole number")
    await _read_body(request, keep=0)
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for i in range(int(chunks)):
            if i:
                await asyncio.sleep(interval)
            await response.write(f"chunk {i}\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left; nothing to finish
    return response
