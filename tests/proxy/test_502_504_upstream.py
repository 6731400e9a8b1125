"""502 when the upstream cannot be reached or breaks its answer, 504 when it is too slow.
Once the status line has gone to the client, a failure cuts the connection so that a
truncated answer can never pass for a whole one."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    RawHandler,
    ServeRaw,
    StartGateway,
    assert_problem,
    read_request_head,
)

PARTIAL = b"x" * 100


async def _key(make_key: MakeKey) -> dict[str, str]:
    issued = await make_key(scopes=[*ECHO_SCOPES, "chat:invoke"])
    return bearer(issued.secret)


async def _via(start_gateway: StartGateway, serve_raw: ServeRaw, handler: RawHandler) -> Gateway:
    """A gateway whose /raw route leads to a raw socket upstream running ``handler``."""
    port = await serve_raw(handler)
    return await start_gateway(
        upstreams={"raw": {"url": f"http://127.0.0.1:{port}", "timeouts": {"read": 5}}},
        routes=[{"name": "raw", "prefix": "/raw", "upstream": "raw"}],
    )


async def _truncated(response: aiohttp.ClientResponse) -> bytes:
    """Read a body that must end in an error, not a clean EOF; what arrived before it."""
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            received += chunk
    return bytes(received)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --- 502 before any byte ---------------------------------------------------------------------


async def test_connection_refused_is_502_problem_quickly(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    headers = await _key(make_key)
    started = time.monotonic()
    response = await http.get(f"{gateway.url}/dead/x", headers=headers)
    body = await assert_problem(response, 502, "upstream_error")
    assert time.monotonic() - started < 1.5
    assert "127.0.0.1" not in body["detail"]  # no internal addresses in the answer


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)


async def _reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)
    _reset(writer)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize(
    "handler", [_close_at_once, _reset_at_once, _garbage], ids=["close", "reset", "not-http"]
)
async def test_upstream_failing_before_answering_is_502(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    handler: RawHandler,
) -> None:
    gateway = await _via(start_gateway, serve_raw, handler)
    response = await http.get(f"{gateway.url}/raw/x", headers=await _key(make_key))
    await assert_problem(response, 502, "upstream_error")


async def test_upstream_failure_on_an_openai_route_is_openai_shaped(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    gateway = await start_gateway(
        routes=[
            {
                "name": "chat-dead",
                "path": "/v2/chat/completions",
                "upstream": "dead",
                "error_format": "openai",
            }
        ]
    )
    response = await http.post(
        f"{gateway.url}/v2/chat/completions", json={}, headers=await _key(make_key)
    )
    assert response.status == 502
    body = await response.json()
    assert body["error"]["code"] == "upstream_error" and body["error"]["message"]
    assert body["error"]["type"] == "server_error"  # the upstream's fault, not the client's


async def test_502_and_504_carry_the_request_id(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    headers = {**await _key(make_key), "X-Request-Id": "trace-502-504"}
    for path in ("/dead/x", "/tight/echo/slow?seconds=1"):
        response = await http.get(f"{gateway.url}{path}", headers=headers)
        assert response.status in (502, 504)
        assert response.headers.get("X-Request-Id") == "trace-502-504", path


# --- failing after the status line -----------------------------------------------------------


async def _short_content_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n")
    writer.write(PARTIAL)
    await writer.drain()
    await asyncio.sleep(0.05)


async def _short_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(b"%x\r\n%s\r\n" % (len(PARTIAL), PARTIAL))
    await writer.drain()
    await asyncio.sleep(0.05)


async def _reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _short_chunked(reader, writer)
    _reset(writer)


@pytest.mark.parametrize(
    "handler",
    [_short_content_length, _short_chunked, _reset_mid_body],
    ids=["content-length-short", "chunked-unterminated", "reset"],
)
async def test_upstream_breaking_mid_response_aborts_the_client_response(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    handler: RawHandler,
) -> None:
    gateway = await _via(start_gateway, serve_raw, handler)
    async with http.get(f"{gateway.url}/raw/x", headers=await _key(make_key)) as response:
        assert response.status == 200
        received = await _truncated(response)
    assert PARTIAL.startswith(received)


# --- 504 ---------------------------------------------------------------------------------------


async def test_upstream_slower_than_the_read_timeout_is_504(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    headers = await _key(make_key)
    started = time.monotonic()
    response = await http.get(f"{gateway.url}/tight/echo/slow?seconds=2", headers=headers)
    elapsed = time.monotonic() - started
    await assert_problem(response, 504, "upstream_timeout")
    assert 0.25 <= elapsed < 1.5  # the 0.3 s read timeout, not the upstream's 2 s


async def test_upstream_stalling_mid_stream_cuts_the_client_response(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    headers = await _key(make_key)
    started = time.monotonic()
    url = f"{gateway.url}/tight/echo/stream?chunks=3&interval=2"
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
        received = await _truncated(response)
    assert received == b"chunk 0\n"
    assert time.monotonic() - started < 1.5


async def test_upstream_error_statuses_pass_through_untouched(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    headers = await _key(make_key)
    for code in (500, 502, 503, 504):
        response = await http.get(f"{gateway.url}/echo/status/{code}", headers=headers)
        assert response.status == code
        assert response.content_type == "application/json"  # the upstream's body, not ours
        assert (await response.json())["status"] == code


async def test_a_steady_stream_outlives_the_idle_read_timeout(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    """The read timeout is idle time, not duration: 6 chunks 0.15 s apart take ~0.9 s."""
    headers = await _key(make_key)
    url = f"{gateway.url}/tight/echo/stream?chunks=6&interval=0.15"
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
        body = await response.read()
    assert body == b"".join(f"chunk {i}\n".encode() for i in range(6))


async def test_a_slow_upload_with_steady_progress_is_not_a_timeout(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(6):
            await asyncio.sleep(0.15)  # 0.9 s in all, each gap under the 0.3 s idle timeout
            yield b"x" * 1000

    headers = await _key(make_key)
    response = await http.post(
        f"{gateway.url}/tight/echo?discard=1", data=slowly(), headers=headers
    )
    assert response.status == 200
    assert (await response.json())["body_bytes"] == 6000


async def test_the_total_timeout_ends_a_steady_but_endless_stream(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Any
) -> None:
    gateway = await start_gateway(
        upstreams={
            "short": {"url": upstream.url, "timeouts": {"connect": 1, "read": 1, "total": 0.6}}
        },
        routes=[{"name": "short", "prefix": "/short", "upstream": "short", "strip_prefix": True}],
    )
    headers = await _key(make_key)
    started = time.monotonic()
    url = f"{gateway.url}/short/echo/stream?chunks=20&interval=0.1"
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
        received = await _truncated(response)
    assert 0.5 <= time.monotonic() - started < 1.5
    assert received.startswith(b"chunk 0\n") and b"chunk 19" not in received
