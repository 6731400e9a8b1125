"""A second credential in a spelling keygate does not read, next to the key it accepted.

Where keygate takes the key from ``Authorization`` (the route's sources hold ``bearer`` or
``api_key_scheme``), every Authorization header must carry that key: another scheme or a
tab-separated Bearer is a second credential an upstream may honour, so the request is
400 and nothing is forwarded or charged. ``?<query_param>=`` is keygate's credential
parameter even where the query is no source: a different value is 400, the same key is
removed from the forwarded query. The upstream here is a raw socket server, so the tests
see the exact bytes it received.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.store.keystore import Issued
from tests.conftest import MakeKey
from tests.proxy.conftest import Gateway, RawResponse, StartGateway, raw_http, read_request_head

Heads = list[str]
ServeRaw = Callable[..., Awaitable[int]]


@pytest.fixture
async def raw_upstream(serve_raw: ServeRaw) -> tuple[int, Heads]:
    """A raw upstream answering 200 to every request, keeping each request head as text."""
    heads: Heads = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            heads.append(head.decode("latin-1"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return await serve_raw(handler), heads


def _routes(port: int, **route: Any) -> dict[str, Any]:
    return {
        "upstreams": {"raw": {"url": f"http://127.0.0.1:{port}"}},
        "routes": [{"name": "raw", "prefix": "/raw", "upstream": "raw", **route}],
    }


async def _send(gateway: Gateway, target: str, *headers: str) -> RawResponse:
    lines = "".join(f"{header}\r\n" for header in headers)
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}Connection: close\r\n\r\n"
    return await raw_http(gateway.port, head.encode("latin-1"))


async def _charged(redis: Redis, prefix: str, issued: Issued) -> tuple[int, int]:
    """The key's total usage (micro-units) and uses, as Redis holds them."""
    key_id = issued.record.id
    total = int(await redis.get(f"{prefix}u:{{{key_id}}}:t") or 0)
    uses = int(await redis.hget(f"{prefix}k:{{{key_id}}}", "total_uses") or 0)
    return total, uses


def _header_lines(head: str) -> list[str]:
    return head.split("\r\n")[1:]


SECOND_AUTHORIZATION = {
    "bearer-tab": "Bearer\t{other}",
    "token": "Token {other}",
    "basic": "Basic {basic}",
    "digest": 'Digest username="u", response="{other}"',
    "bare": "{other}",
    "api-key-scheme-disabled": "Api-Key {other}",
}


@pytest.mark.parametrize("spelling", SECOND_AUTHORIZATION.values(), ids=SECOND_AUTHORIZATION)
@pytest.mark.parametrize("accepted_in", ["x-api-key", "authorization"])
async def test_a_second_authorization_in_another_spelling_is_400(
    start_gateway: StartGateway,
    make_key: MakeKey,
    raw_upstream: tuple[int, Heads],
    redis: Redis,
    key_prefix: str,
    spelling: str,
    accepted_in: str,
) -> None:
    port, heads = raw_upstream
    gateway = await start_gateway(
        keys={"sources": ["bearer", "x-api-key"]}, **_routes(port, cost={"fixed": 0.25})
    )
    issued, other = await make_key(), await make_key()
    basic = base64.b64encode(f"user:{other.secret}".encode()).decode()
    second = "Authorization: " + spelling.format(other=other.secret, basic=basic)
    first = (
        f"x-api-key: {issued.secret}"
        if accepted_in == "x-api-key"
        else f"Authorization: Bearer {issued.secret}"
    )
    for order in ((first, second), (second, first)):
        response = await _send(gateway, "/raw/x", *order)
        assert response.status == 400, response.body
        body = json.loads(response.body)
        assert body["code"] == "invalid_request" and "Authorization" in body["detail"]
        assert str(other.secret) not in response.body.decode()
    assert heads == []  # nothing forwarded
    assert await _charged(redis, key_prefix, issued) == (0, 0)  # nothing charged
    # The key alone goes through, and is charged: the check above measures something.
    response = await _send(gateway, "/raw/x", first)
    assert response.status == 200 and len(heads) == 1
    assert await _charged(redis, key_prefix, issued) == (250_000, 1)


async def test_an_authorization_keygate_does_not_read_alone_is_still_no_key(
    start_gateway: StartGateway, make_key: MakeKey, raw_upstream: tuple[int, Heads]
) -> None:
    port, heads = raw_upstream
    gateway = await start_gateway(**_routes(port))
    issued = await make_key()
    response = await _send(gateway, "/raw/x", f"Authorization: Token {issued.secret}")
    assert response.status == 401 and json.loads(response.body)["code"] == "missing_key"
    assert heads == []


async def test_the_same_key_in_both_authorization_and_x_api_key_is_one_credential(
    start_gateway: StartGateway, make_key: MakeKey, raw_upstream: tuple[int, Heads]
) -> None:
    port, heads = raw_upstream
    gateway = await start_gateway(**_routes(port))
    issued = await make_key()
    response = await _send(
        gateway,
        "/raw/x",
        f"Authorization: Bearer {issued.secret}",
        f"x-api-key: {issued.secret}",
        f"X_Api_Key: {issued.secret}",  # CGI-style upstreams read it as x-api-key
    )
    assert response.status == 200, response.body
    [head] = heads
    assert str(issued.secret) not in head
    lower = [line.lower() for line in _header_lines(head)]
    assert not [line for line in lower if line.startswith(("authorization", "x-api-key", "x_api"))]


async def test_an_underscore_spelling_of_x_api_key_never_reaches_the_upstream(
    start_gateway: StartGateway, make_key: MakeKey, raw_upstream: tuple[int, Heads]
) -> None:
    port, heads = raw_upstream
    gateway = await start_gateway(**_routes(port))
    issued, other = await make_key(), await make_key()
    response = await _send(
        gateway, "/raw/x", f"Authorization: Bearer {issued.secret}", f"X_API_KEY: {other.secret}"
    )
    assert response.status == 200, response.body
    [head] = heads
    assert str(other.secret) not in head and str(issued.secret) not in head


async def test_an_api_key_query_parameter_next_to_a_header_key_is_400_when_it_differs(
    start_gateway: StartGateway,
    make_key: MakeKey,
    raw_upstream: tuple[int, Heads],
    redis: Redis,
    key_prefix: str,
) -> None:
    port, heads = raw_upstream
    gateway = await start_gateway(**_routes(port, cost={"fixed": 0.25}))  # query: no source
    issued, other = await make_key(), await make_key()
    header = f"Authorization: Bearer {issued.secret}"
    for query in (
        f"api_key={other.secret}",
        f"a=1&api_key={other.secret}",
        f"api%5Fkey={other.secret}",  # the name escaped: upstreams decode it
        f"api_key={issued.secret}&api_key={other.secret}",
        "api_key=",
    ):
        response = await _send(gateway, f"/raw/x?{query}", header)
        assert response.status == 400, (query, response.body)
        assert "api_key" in json.loads(response.body)["detail"]
    assert heads == []
    assert await _charged(redis, key_prefix, issued) == (0, 0)


@pytest.mark.parametrize("query_is_a_source", [False, True], ids=["query-no-source", "query"])
async def test_the_accepted_key_in_the_query_is_removed_and_the_rest_kept_byte_for_byte(
    start_gateway: StartGateway,
    make_key: MakeKey,
    raw_upstream: tuple[int, Heads],
    query_is_a_source: bool,
) -> None:
    port, heads = raw_upstream
    keys = {"sources": ["x-api-key", "query"]} if query_is_a_source else {}
    gateway = await start_gateway(keys=keys, **_routes(port))
    issued = await make_key()
    secret = issued.secret
    target = f"/raw/x?a=1&api_key={secret}&b=%20&c=a+b&api%5Fkey={secret}&e&&f=%2B"
    response = await _send(gateway, target, f"x-api-key: {secret}")
    assert response.status == 200, response.body
    assert heads[0].startswith("GET /raw/x?a=1&b=%20&c=a+b&e&&f=%2B HTTP/1.1\r\n")
    assert str(secret) not in heads[0]


async def test_another_query_parameter_name_is_left_alone(
    start_gateway: StartGateway, make_key: MakeKey, raw_upstream: tuple[int, Heads]
) -> None:
    port, heads = raw_upstream
    gateway = await start_gateway(**_routes(port))
    issued = await make_key()
    target = "/raw/x?key=abc&api_keys=1&x_api_key=2&%41=b"
    response = await _send(gateway, target, f"x-api-key: {issued.secret}")
    assert response.status == 200, response.body
    assert heads[0].startswith(f"GET {target} HTTP/1.1\r\n")


async def test_a_route_that_leaves_authorization_out_passes_it_to_the_upstream(
    start_gateway: StartGateway, make_key: MakeKey, raw_upstream: tuple[int, Heads]
) -> None:
    # The client's own upstream credential (BYOK), with the keygate key in x-api-key.
    port, heads = raw_upstream
    gateway = await start_gateway(**_routes(port, sources=["x-api-key"]))
    issued = await make_key()
    own = "Authorization: Token upstream-own-credential"
    response = await _send(gateway, "/raw/x", f"x-api-key: {issued.secret}", own)
    assert response.status == 200, response.body
    assert own in _header_lines(heads[0])


async def test_a_client_authorization_never_replaces_the_upstream_urls_credentials(
    start_gateway: StartGateway, make_key: MakeKey, raw_upstream: tuple[int, Heads]
) -> None:
    port, heads = raw_upstream
    gateway = await start_gateway(
        upstreams={"raw": {"url": f"http://svc:s3cret@127.0.0.1:{port}"}},
        routes=[{"name": "raw", "prefix": "/raw", "upstream": "raw", "sources": ["x-api-key"]}],
    )
    issued = await make_key()
    key = f"x-api-key: {issued.secret}"
    response = await _send(gateway, "/raw/x", key, "Authorization: Basic Y2xpZW50OmNob3Nlbg==")
    assert response.status == 400, response.body
    assert "Authorization" in json.loads(response.body)["detail"]
    assert heads == []
    response = await _send(gateway, "/raw/x", key)
    assert response.status == 200
    expected = base64.b64encode(b"svc:s3cret").decode()
    assert f"Authorization: Basic {expected}" in _header_lines(heads[0])
