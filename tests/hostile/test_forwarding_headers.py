"""Client-sent forwarding headers other than X-Forwarded-*: ``X-Real-IP`` is replaced by
the address keygate's peer connected from (a client cannot choose the address an upstream
rate-limits or logs), and a client's ``Forwarded`` chain reaches the upstream only with
keygate's own element appended (RFC 7239 §4), as ``X-Forwarded-For`` is extended. A raw
upstream shows the exact header lines it received."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import MakeKey
from tests.proxy.conftest import Gateway, StartGateway, raw_http, read_request_head

ServeRaw = Callable[..., Awaitable[int]]


@pytest.fixture
async def raw_gateway(
    start_gateway: StartGateway, serve_raw: ServeRaw
) -> tuple[Gateway, list[str]]:
    heads: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append((await read_request_head(reader)).decode("latin-1"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    port = await serve_raw(handler)
    routes: list[dict[str, Any]] = [{"name": "raw", "prefix": "/raw", "upstream": "raw"}]
    gateway = await start_gateway(
        upstreams={"raw": {"url": f"http://127.0.0.1:{port}"}}, routes=routes
    )
    return gateway, heads


async def _forward(gateway: Gateway, secret: str | None, *headers: str) -> None:
    lines = "".join(f"{header}\r\n" for header in headers)
    head = (
        f"GET /raw/x HTTP/1.1\r\nHost: api.example.com\r\nx-api-key: {secret}\r\n{lines}"
        "Connection: close\r\n\r\n"
    )
    response = await raw_http(gateway.port, head.encode("latin-1"))
    assert response.status == 200, response.body


def _values(head: str, name: str) -> list[str]:
    found = []
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower().replace("_", "-") == name.lower():
            found.append(value.strip())
    return found


async def test_a_client_x_real_ip_is_replaced_by_the_connecting_address(
    raw_gateway: tuple[Gateway, list[str]], make_key: MakeKey
) -> None:
    gateway, heads = raw_gateway
    issued = await make_key()
    await _forward(gateway, issued.secret, "X-Real-IP: 203.0.113.9", "X_Real_IP: 198.51.100.1")
    await _forward(gateway, issued.secret)
    for head in heads:
        assert _values(head, "X-Real-IP") == ["127.0.0.1"]
        assert "203.0.113.9" not in head and "198.51.100.1" not in head


async def test_a_client_forwarded_chain_gets_keygates_element_appended(
    raw_gateway: tuple[Gateway, list[str]], make_key: MakeKey
) -> None:
    gateway, heads = raw_gateway
    issued = await make_key()
    await _forward(
        gateway,
        issued.secret,
        "Forwarded: for=203.0.113.9;proto=https",
        'Forwarded: for="[2001:db8::1]"',
    )
    ours = 'for=127.0.0.1;proto=http;host="api.example.com"'
    assert _values(heads[0], "Forwarded") == [
        f'for=203.0.113.9;proto=https, for="[2001:db8::1]", {ours}'
    ]
    # None sent: none invented (X-Forwarded-For/Proto/Host say the same).
    await _forward(gateway, issued.secret)
    assert _values(heads[1], "Forwarded") == []
    assert _values(heads[1], "X-Forwarded-For") == ["127.0.0.1"]
