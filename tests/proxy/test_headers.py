"""Headers both ways: hop-by-hop dropped, X-Forwarded-*, X-Request-Id, identity headers (and
client spoofs of them stripped), the credential hidden, path rewriting and the query kept."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    LOOPBACK,
    Gateway,
    ServeRaw,
    StartGateway,
    Upstream,
    assert_problem,
    echoed,
    raw_http,
    read_request_head,
)

GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


def _names(echo: dict[str, Any]) -> list[str]:
    return [name.lower() for name, _ in echo["header_list"]]


def _values(echo: dict[str, Any], name: str) -> list[str]:
    return [value for n, value in echo["header_list"] if n.lower() == name.lower()]


async def test_hop_by_hop_request_headers_are_not_forwarded(
    gateway: Gateway, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    head = (
        "GET /echo/x HTTP/1.1\r\n"
        "Host: gw\r\n"
        f"Authorization: Bearer {issued.secret}\r\n"
        "Connection: close, X-Hop-Custom\r\n"
        "X-Hop-Custom: named in Connection\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Upgrade: h2c\r\n"
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "X-End-To-End: kept\r\n"
        "\r\n"
    )
    response = await raw_http(gateway.port, head.encode())
    assert response.status == 200, response.body
    echo = json.loads(response.body)
    names = _names(echo)
    for hop in (
        "connection",
        "x-hop-custom",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ):
        assert hop not in names, hop
    assert _values(echo, "X-End-To-End") == ["kept"]


async def _hop_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/plain\r\n"
            b"Content-Length: 2\r\n"
            b"Connection: keep-alive, X-Upstream-Hop\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Upstream-Hop: internal\r\n"
            b"Proxy-Authenticate: Basic realm=upstream\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Upgrade: h2c\r\n"
            b"Trailer: X-Checksum\r\n"
            b"X-End-To-End: yes\r\n"
            b"Set-Cookie: a=1; Path=/\r\n"
            b"Set-Cookie: b=2; Path=/\r\n"
            b"X-Request-Id: chosen-by-upstream\r\n"
            b"\r\nok"
        )
        await writer.drain()


async def test_hop_by_hop_response_headers_are_not_returned(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
) -> None:
    port = await serve_raw(_hop_response)
    gateway = await start_gateway(
        upstreams={"raw": {"url": f"http://{LOOPBACK}:{port}"}},
        routes=[{"name": "raw", "prefix": "/raw", "upstream": "raw"}],
    )
    issued = await make_key()
    response = await http.get(
        f"{gateway.url}/raw/x", headers={**bearer(issued.secret), "X-Request-Id": "client-id"}
    )
    assert response.status == 200 and await response.read() == b"ok"
    for hop in ("Keep-Alive", "X-Upstream-Hop", "Proxy-Authenticate", "Upgrade", "Trailer"):
        assert hop not in response.headers, hop
    assert "Proxy-Connection" not in response.headers
    assert "x-upstream-hop" not in response.headers.get("Connection", "").lower()
    assert response.headers["X-End-To-End"] == "yes"
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers.getall("X-Request-Id") == ["client-id"]


async def test_forwarded_headers_are_set_and_client_ones_appended_or_replaced(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    url = f"{gateway.url}/echo/x"
    echo = await echoed(await http.get(url, headers=bearer(issued.secret)))
    assert _values(echo, "X-Forwarded-For") == [LOOPBACK]
    assert _values(echo, "X-Forwarded-Proto") == ["http"]
    assert _values(echo, "X-Forwarded-Host") == [f"{LOOPBACK}:{gateway.port}"]
    assert _values(echo, "Host") == [f"{LOOPBACK}:{upstream.port}"]  # the upstream's own

    echo = await echoed(
        await http.get(
            url,
            headers={
                **bearer(issued.secret),
                "Host": "api.example.com",
                "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "spoofed.example",
            },
        )
    )
    assert _values(echo, "X-Forwarded-For") == [f"203.0.113.7, {LOOPBACK}"]
    assert _values(echo, "X-Forwarded-Proto") == ["http"]  # what keygate saw, not the claim
    assert _values(echo, "X-Forwarded-Host") == ["api.example.com"]
    assert _values(echo, "Host") == [f"{LOOPBACK}:{upstream.port}"]


async def test_every_x_forwarded_for_line_is_kept_in_order(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    headers: CIMultiDict[str] = CIMultiDict(bearer(issued.secret))
    headers.add("X-Forwarded-For", "203.0.113.7")
    headers.add("X-Forwarded-For", "198.51.100.2")
    echo = await echoed(await http.get(f"{gateway.url}/echo/x", headers=headers))
    assert _values(echo, "X-Forwarded-For") == [f"203.0.113.7, 198.51.100.2, {LOOPBACK}"]


@pytest.mark.parametrize("sent", ["abc-123", "trace_1.2:3", "a" * 128])
async def test_a_sane_request_id_is_kept_sent_upstream_and_returned(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, sent: str
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    headers = {**bearer(issued.secret), "X-Request-Id": sent}
    response = await http.get(f"{gateway.url}/echo/x", headers=headers)
    echo = await echoed(response)
    assert _values(echo, "X-Request-Id") == [sent]
    assert response.headers.getall("X-Request-Id") == [sent]


@pytest.mark.parametrize("sent", [None, "", "has space", "a" * 129, "semi;colon", "<script>"])
async def test_a_missing_or_odd_request_id_is_replaced_by_a_generated_one(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, sent: str | None
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    headers = bearer(issued.secret) | ({} if sent is None else {"X-Request-Id": sent})
    response = await http.get(f"{gateway.url}/echo/x", headers=headers)
    echo = await echoed(response)
    returned = response.headers.getall("X-Request-Id")
    assert len(returned) == 1 and GENERATED_ID.match(returned[0])
    assert _values(echo, "X-Request-Id") == returned


async def test_denials_carry_the_request_id_too(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    response = await http.get(f"{gateway.url}/echo/x", headers={"X-Request-Id": "trace-401"})
    await assert_problem(response, 401, "missing_key")
    assert response.headers["X-Request-Id"] == "trace-401"
    response = await http.get(f"{gateway.url}/nowhere")
    await assert_problem(response, 404, "not_found")
    assert GENERATED_ID.match(response.headers["X-Request-Id"])


async def test_identity_headers_reach_the_upstream_and_client_spoofs_are_stripped(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=["echo:read", "models:*"], workspace_id="ws-real")
    headers: CIMultiDict[str] = CIMultiDict(bearer(issued.secret))
    for name, value in (
        ("X-Keygate-Key-Id", "forged-id"),
        ("x-keygate-key-id", "forged-lower"),
        ("X-KEYGATE-WORKSPACE-ID", "ws-other"),
        ("x-KeyGate-Scopes", "*"),
        ("X-Keygate-Admin", "true"),
        ("X-Keygate-User-Id", "someone"),
    ):
        headers.add(name, value)
    echo = await echoed(await http.get(f"{gateway.url}/echo/x", headers=headers))
    identity = sorted(
        (name.lower(), value)
        for name, value in echo["header_list"]
        if name.lower().startswith("x-keygate-")
    )
    assert identity == [
        ("x-keygate-key-id", issued.record.id),
        ("x-keygate-scopes", "echo:read models:*"),
        ("x-keygate-workspace-id", "ws-real"),
    ]


async def test_underscore_spellings_of_identity_headers_are_stripped(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    headers = {**bearer(issued.secret), "X_Keygate_Key_Id": "forged", "x_keygate_scopes": "*"}
    echo = await echoed(await http.get(f"{gateway.url}/echo/x", headers=headers))
    spoofs = [n for n in _names(echo) if n.replace("_", "-").startswith("x-keygate-")]
    assert sorted(spoofs) == ["x-keygate-key-id", "x-keygate-scopes", "x-keygate-workspace-id"]


@pytest.mark.parametrize(
    "carrier",
    [("Authorization", "Bearer {}"), ("Authorization", "Api-Key {}"), ("x-api-key", "{}")],
    ids=["bearer", "api-key-scheme", "x-api-key"],
)
async def test_the_credential_is_hidden_from_the_upstream_by_default(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    carrier: tuple[str, str],
) -> None:
    name, template = carrier
    issued = await make_key(scopes=ECHO_SCOPES)
    headers = {name: template.format(issued.secret)}
    hidden = await start_gateway()
    echo = await echoed(await http.get(f"{hidden.url}/echo/x", headers=headers))
    assert name.lower() not in _names(echo)
    assert str(issued.secret) not in str(echo)
    kept = await start_gateway(keys={"hide_credentials": False})
    echo = await echoed(await http.get(f"{kept.url}/echo/x", headers=headers))
    assert _values(echo, name) == [template.format(issued.secret)]


async def test_other_authorization_schemes_reach_the_upstream_where_keygate_reads_none(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    headers = {"x-api-key": str(issued.secret), "Authorization": "Basic dXBzdHJlYW0="}
    # Authorization is no source: it belongs to the upstream (the client's own credential).
    gateway = await start_gateway(keys={"sources": ["x-api-key"]})
    echo = await echoed(await http.get(f"{gateway.url}/echo/x", headers=headers))
    assert _values(echo, "Authorization") == ["Basic dXBzdHJlYW0="]
    assert "x-api-key" not in _names(echo)
    # Where keygate reads Authorization, another scheme beside the key is a second credential.
    default = await start_gateway()
    response = await http.get(f"{default.url}/echo/x", headers=headers)
    assert response.status == 400


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/svc/echo/a/b", "/echo/a/b"),  # strip_prefix
        ("/svc/echo", "/echo"),
        ("/hello", "/echo/greeting"),  # rewrite of an exact path
        ("/open", "/echo/open"),  # rewrite of a prefix keeps the rest
        ("/open/x/y", "/echo/open/x/y"),
        ("/echo/kept/as/is", "/echo/kept/as/is"),
    ],
)
async def test_strip_prefix_and_rewrite(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    upstream: Upstream,
    path: str,
    forwarded: str,
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    await echoed(await http.get(f"{gateway.url}{path}", headers=bearer(issued.secret)))
    assert [hit.raw_path for hit in upstream.hits] == [forwarded]


async def test_the_query_string_passes_through_byte_for_byte(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    query = "b=1&a=2&b=3&sp=%20x+y&amp=a%26b&slash=a/b&enc=a%2Fb&u=%E2%9C%93&empty=&flag&x=%3D"
    for path, forwarded in (("/echo/q", "/echo/q"), ("/svc/echo/q", "/echo/q")):
        url = URL(f"{gateway.url}{path}?{query}", encoded=True)
        await echoed(await http.get(url, headers=bearer(issued.secret)))
        assert upstream.hits[-1].raw_path == f"{forwarded}?{query}"


async def test_the_proxy_invents_no_request_headers(gateway: Gateway, make_key: MakeKey) -> None:
    """No Accept, Accept-Encoding, User-Agent or Content-Type the client did not send:
    an invented Accept-Encoding would have the upstream compress for a client that never
    asked, and an invented Content-Type mislabels bodies."""
    issued = await make_key(scopes=ECHO_SCOPES)
    for method, body in (("GET", ""), ("POST", "raw bytes")):
        head = (
            f"{method} /echo/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {issued.secret}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        )
        response = await raw_http(gateway.port, head.encode())
        assert response.status == 200, response.body
        names = _names(json.loads(response.body))
        for invented in ("accept", "accept-encoding", "user-agent", "content-type"):
            assert invented not in names, (method, invented)
