"""The upstream side of the proxy (gateway/proxy/upstream_http.py): keep-alive pools that
respect pool_size, a request re-sent when a reused idle connection turns out to be closed,
and answers framed every way HTTP/1.1 allows (Content-Length, chunked, until EOF, HEAD,
interim 1xx), each reaching the client whole."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
from aiohttp import web

from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    RawHandler,
    ServeApp,
    ServeRaw,
    StartGateway,
    assert_problem,
    read_request_head,
)


async def _key(make_key: MakeKey) -> dict[str, str]:
    issued = await make_key(scopes=list(ECHO_SCOPES))
    return bearer(issued.secret)


async def _via(
    start_gateway: StartGateway, url: str, *, pool_size: int = 100, prefix: str = "/up"
) -> Gateway:
    return await start_gateway(
        upstreams={"up": {"url": url, "pool_size": pool_size, "timeouts": {"read": 5}}},
        routes=[{"name": "up", "prefix": prefix, "upstream": "up"}],
    )


async def _raw(start_gateway: StartGateway, serve_raw: ServeRaw, handler: RawHandler) -> Gateway:
    port = await serve_raw(handler)
    return await _via(start_gateway, f"http://127.0.0.1:{port}")


# --- keep-alive and the pool -----------------------------------------------------------------


async def test_sequential_requests_share_one_upstream_connection(
    start_gateway: StartGateway, serve_app: ServeApp, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    peers: list[object] = []

    async def handler(request: web.BaseRequest) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(text="ok")

    gateway = await _via(start_gateway, f"http://127.0.0.1:{await serve_app(handler)}")
    headers = await _key(make_key)
    for _ in range(5):
        async with http.get(f"{gateway.url}/up/x", headers=headers) as response:
            assert response.status == 200
            assert await response.text() == "ok"
    assert len(peers) == 5
    assert len(set(peers)) == 1  # one keep-alive connection served all five


async def test_pool_size_bounds_concurrent_upstream_connections(
    start_gateway: StartGateway, serve_app: ServeApp, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    in_flight = 0
    most = 0
    peers: set[object] = set()

    async def handler(request: web.BaseRequest) -> web.Response:
        nonlocal in_flight, most
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return web.Response(text=request.path)

    url = f"http://127.0.0.1:{await serve_app(handler)}"
    gateway = await _via(start_gateway, url, pool_size=2)
    headers = await _key(make_key)

    async def one(i: int) -> str:
        async with http.get(f"{gateway.url}/up/{i}", headers=headers) as response:
            assert response.status == 200
            return await response.text()

    answers = await asyncio.gather(*(one(i) for i in range(12)))
    assert answers == [f"/up/{i}" for i in range(12)]  # each its own answer, none mixed up
    assert most == 2
    assert len(peers) == 2


async def test_a_reused_connection_closed_by_the_upstream_is_retried_unseen(
    start_gateway: StartGateway, serve_raw: ServeRaw, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    """The upstream answers keep-alive, then drops the connection when the next request
    arrives (as a server whose idle timeout fires at that moment does): the client sees
    nothing of it, and the request reaches the upstream once, on a new connection."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request_head(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await read_request_head(reader)  # the second request on this connection: dropped
        writer.transport.abort()

    gateway = await _raw(start_gateway, serve_raw, handler)
    headers = await _key(make_key)
    for _ in range(3):
        async with http.get(f"{gateway.url}/up/x", headers=headers) as response:
            assert response.status == 200
            assert await response.text() == "first"
    assert served == 3  # each request answered once, each on a fresh connection


async def test_a_post_is_never_sent_twice(
    start_gateway: StartGateway, serve_raw: ServeRaw, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    """A request the upstream may not receive twice gets 502 rather than a second send."""
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await read_request_head(reader)
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request_head(reader)
        requests += 1
        writer.transport.abort()

    gateway = await _raw(start_gateway, serve_raw, handler)
    headers = await _key(make_key)
    async with http.get(f"{gateway.url}/up/x", headers=headers) as response:
        assert response.status == 200
    async with http.post(f"{gateway.url}/up/x", headers=headers, data=b"") as response:
        await assert_problem(response, 502, "upstream_error")
    assert requests == 2


# --- framing of answers ----------------------------------------------------------------------


async def test_an_answer_ending_with_the_connection_is_passed_whole(
    start_gateway: StartGateway, serve_raw: ServeRaw, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    body = b"no length, no chunks: the end is the close" * 100

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for i in range(0, len(body), 1000):
            writer.write(body[i : i + 1000])
            await writer.drain()
        writer.close()

    gateway = await _raw(start_gateway, serve_raw, handler)
    async with http.get(f"{gateway.url}/up/x", headers=await _key(make_key)) as response:
        assert response.status == 200
        assert await response.read() == body


async def test_head_answers_end_at_their_headers(
    start_gateway: StartGateway, serve_raw: ServeRaw, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            assert head.startswith(b"HEAD ")
            # The length of the body a GET would get, and no body.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Kind: head\r\n\r\n")
            await writer.drain()

    gateway = await _raw(start_gateway, serve_raw, handler)
    headers = await _key(make_key)
    for _ in range(2):
        async with asyncio.timeout(5):
            async with http.head(f"{gateway.url}/up/x", headers=headers) as response:
                assert response.status == 200
                assert response.headers["X-Kind"] == "head"
                assert response.headers["Content-Length"] == "1234"


async def test_an_interim_100_continue_is_skipped(
    start_gateway: StartGateway, serve_raw: ServeRaw, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        await reader.read()

    gateway = await _raw(start_gateway, serve_raw, handler)
    async with http.get(f"{gateway.url}/up/x", headers=await _key(make_key)) as response:
        assert response.status == 201
        assert await response.text() == "done"


async def test_an_answer_that_is_not_http_is_502(
    start_gateway: StartGateway, serve_raw: ServeRaw, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await reader.read()

    gateway = await _raw(start_gateway, serve_raw, handler)
    async with http.get(f"{gateway.url}/up/x", headers=await _key(make_key)) as response:
        body = await assert_problem(response, 502, "upstream_error")
    assert "SSH" not in str(body)


# --- what is sent ----------------------------------------------------------------------------


async def test_request_head_host_base_path_and_credentials_of_the_upstream_url(
    start_gateway: StartGateway, serve_raw: ServeRaw, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request_head(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await reader.read()

    port = await serve_raw(handler)
    gateway = await _via(start_gateway, f"http://svc:s3cret@127.0.0.1:{port}/api/v2")
    async with http.get(f"{gateway.url}/up/x?q=1%202", headers=await _key(make_key)) as response:
        assert response.status == 204
    lines = heads[0].decode().split("\r\n")
    assert lines[0] == "GET /api/v2/up/x?q=1%202 HTTP/1.1"
    assert f"Host: 127.0.0.1:{port}" in lines
    assert f"Authorization: Basic {base64.b64encode(b'svc:s3cret').decode()}" in lines


async def test_a_streamed_upload_without_length_is_sent_chunked(
    start_gateway: StartGateway, serve_app: ServeApp, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    seen: dict[str, object] = {}

    async def handler(request: web.BaseRequest) -> web.Response:
        seen["te"] = request.headers.get("Transfer-Encoding")
        seen["body"] = await request.read()
        return web.Response(text="ok")

    gateway = await _via(start_gateway, f"http://127.0.0.1:{await serve_app(handler)}")

    async def parts() -> object:
        for i in range(50):
            yield b"part %d;" % i

    async with http.post(
        f"{gateway.url}/up/x", headers=await _key(make_key), data=parts()
    ) as response:
        assert response.status == 200
    assert seen["te"] == "chunked"
    assert seen["body"] == b"".join(b"part %d;" % i for i in range(50))


async def test_an_early_answer_to_an_upload_reaches_the_client(
    start_gateway: StartGateway, serve_app: ServeApp, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    """The upstream refuses an upload before reading it (413): the client gets the 413."""

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(status=413, text="too big")

    gateway = await _via(start_gateway, f"http://127.0.0.1:{await serve_app(handler)}")
    headers = {**await _key(make_key), "Content-Length": str(1 << 20)}
    async with http.post(f"{gateway.url}/up/x", headers=headers, data=b"x" * (1 << 20)) as r:
        assert r.status == 413
        assert await r.text() == "too big"
