"""Streaming both ways: SSE and chunked answers reach the client chunk by chunk, request bodies
pass without being buffered (a large upload keeps memory flat), and a client that leaves
makes the upstream request go away too."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import resource
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    LOOPBACK,
    Gateway,
    ServeApp,
    StartGateway,
    echoed,
    rss_bytes,
)

MB = 1 << 20
UPLOAD_BYTES = 128 * MB


async def _timed_lines(response: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    lines = []
    while line := await response.content.readline():
        lines.append((time.monotonic(), line))
    return lines


async def test_sse_events_arrive_one_by_one(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=["chat:invoke"], resources=["demo-small"])
    delay = 0.1
    body = {
        "model": "demo-small",
        "stream": True,
        "messages": [{"role": "user", "content": "one two three four five"}],
    }
    headers = {**bearer(issued.secret), "X-Demo-Delay": str(delay)}
    started = time.monotonic()
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert "Content-Length" not in r.headers
        lines = await _timed_lines(r)
    events = [
        (at, line[len(b"data: ") :].strip()) for at, line in lines if line.startswith(b"data: ")
    ]
    assert events[-1][1] == b"[DONE]"
    words = [
        (at, json.loads(data)["choices"][0]["delta"].get("content"))
        for at, data in events[:-1]
        if json.loads(data)["choices"][0]["delta"].get("content")
    ]
    assert "".join(word for _, word in words) == "Echo: one two three four five"
    assert words[0][0] - started < 4 * delay  # the first word did not wait for the rest
    assert events[-1][0] - words[0][0] >= 4 * delay  # 5 more delays followed it
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(words)]
    assert min(gaps) >= delay / 2, gaps  # spread out, not bunched in a buffer


async def test_chunked_lines_arrive_as_the_upstream_sends_them(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    url = f"{gateway.url}/echo/stream?chunks=4&interval=0.12"
    async with http.get(url, headers=bearer(issued.secret)) as response:
        assert response.status == 200
        lines = await _timed_lines(response)
    assert [line for _, line in lines] == [f"chunk {i}\n".encode() for i in range(4)]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(lines)]
    assert min(gaps) >= 0.06, gaps


async def _ticker(request: web.Request) -> web.StreamResponse:
    """Five lines, each carrying the monotonic time it was written at (same process clock)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    for _ in range(5):
        await response.write(f"{time.monotonic():.6f}\n".encode())
        await asyncio.sleep(0.08)
    await response.write_eof()
    return response


async def test_each_chunk_reaches_the_client_within_milliseconds_of_being_sent(
    start_gateway: StartGateway,
    serve_app: ServeApp,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
) -> None:
    app = web.Application()
    app.router.add_get("/tick", _ticker)
    port = await serve_app(app)
    gateway = await start_gateway(
        upstreams={"ticker": {"url": f"http://{LOOPBACK}:{port}"}},
        routes=[{"name": "ticker", "path": "/tick", "upstream": "ticker"}],
    )
    issued = await make_key()
    async with http.get(f"{gateway.url}/tick", headers=bearer(issued.secret)) as response:
        lines = await _timed_lines(response)
    assert len(lines) == 5
    lags = [arrived - float(line) for arrived, line in lines]
    assert max(lags) < 0.06, lags  # one line held back would lag 0.08 s


# --- request bodies ------------------------------------------------------------------------------


async def test_request_body_reaches_the_upstream_before_the_client_finished_sending(
    start_gateway: StartGateway,
    serve_app: ServeApp,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
) -> None:
    first_bytes = asyncio.Event()

    async def sink(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            first_bytes.set()
        return web.json_response({"size": size})

    app = web.Application()
    app.router.add_post("/sink", sink)
    port = await serve_app(app)
    gateway = await start_gateway(
        upstreams={"sink": {"url": f"http://{LOOPBACK}:{port}"}},
        routes=[{"name": "sink", "path": "/sink", "upstream": "sink"}],
    )
    issued = await make_key()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        # Only continues once the upstream holds the first bytes: a proxy that buffered the
        # whole body would wait here forever (and the test would time out).
        await asyncio.wait_for(first_bytes.wait(), 5)
        yield b"b" * 1000

    response = await http.post(f"{gateway.url}/sink", data=body(), headers=bearer(issued.secret))
    assert response.status == 200
    assert await response.json() == {"size": 2000}


async def test_large_upload_passes_intact_with_flat_memory(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    digest = hashlib.sha256()
    block = bytes(range(256)) * (MB // 256)

    async def body() -> AsyncIterator[bytes]:
        for i in range(UPLOAD_BYTES // MB):
            chunk = i.to_bytes(4, "big") + block[4:]
            digest.update(chunk)
            yield chunk

    peak = baseline = rss_bytes()
    max_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        response = await http.post(
            f"{gateway.url}/echo/upload?discard=1", data=body(), headers=bearer(issued.secret)
        )
        echo = await echoed(response)
    finally:
        done.set()
        await sampler
    max_rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert echo == {"body_bytes": UPLOAD_BYTES, "sha256": digest.hexdigest()}
    assert peak - baseline < UPLOAD_BYTES // 8, (peak - baseline) // MB
    assert max_rss_after - max_rss_before < UPLOAD_BYTES // 8


# --- the client leaves ---------------------------------------------------------------------------


class Departure:
    """A purpose-built upstream whose handlers note when they stop early, and why."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.gone = asyncio.Event()
        self.how = ""

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        self.started.set()
        try:
            for i in range(200):
                await response.write(f"tick {i}\n".encode())
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.how = "cancelled"
            self.gone.set()
            raise
        except ConnectionResetError:
            self.how = "write failed"
            self.gone.set()
        return response

    async def slow(self, request: web.Request) -> web.Response:
        self.started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.how = "cancelled"
            self.gone.set()
            raise
        return web.Response(text="too late")


async def _departure_gateway(
    start_gateway: StartGateway, serve_app: ServeApp, departure: Departure
) -> Gateway:
    app = web.Application()
    app.router.add_get("/stream", departure.stream)
    app.router.add_get("/slow", departure.slow)
    port = await serve_app(app, handler_cancellation=True)
    return await start_gateway(
        upstreams={"leaving": {"url": f"http://{LOOPBACK}:{port}"}},
        routes=[
            {"name": "leaving", "prefix": "/leaving", "upstream": "leaving", "strip_prefix": True}
        ],
    )


async def test_client_leaving_mid_stream_ends_the_upstream_request(
    start_gateway: StartGateway, serve_app: ServeApp, make_key: MakeKey
) -> None:
    departure = Departure()
    gateway = await _departure_gateway(start_gateway, serve_app, departure)
    issued = await make_key()
    async with aiohttp.ClientSession() as client:
        response = await client.get(f"{gateway.url}/leaving/stream", headers=bearer(issued.secret))
        assert response.status == 200
        assert await response.content.readline() == b"tick 0\n"
        left = time.monotonic()
        response.close()  # drops the connection mid-body
    await asyncio.wait_for(departure.gone.wait(), 3)
    assert time.monotonic() - left < 1.0
    assert departure.how in ("cancelled", "write failed")


async def test_client_leaving_before_the_answer_cancels_the_upstream_request(
    start_gateway: StartGateway, serve_app: ServeApp, make_key: MakeKey
) -> None:
    departure = Departure()
    gateway = await _departure_gateway(start_gateway, serve_app, departure)
    issued = await make_key()
    async with aiohttp.ClientSession() as client:
        request = asyncio.create_task(
            client.get(f"{gateway.url}/leaving/slow", headers=bearer(issued.secret))
        )
        await asyncio.wait_for(departure.started.wait(), 3)
        request.cancel()  # the client gives up while the upstream is still working
        left = time.monotonic()
    await asyncio.wait_for(departure.gone.wait(), 3)
    assert time.monotonic() - left < 1.0
    assert departure.how == "cancelled"
