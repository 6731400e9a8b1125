"""404 for paths no route serves (never forwarded), 400 or 404 for every traversal spelling
(sent as raw request lines: HTTP clients would normalise them), and 405 with Allow."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    Upstream,
    assert_problem,
    echoed,
    raw_http,
)


def _get(target: str, secret: str | None, method: str = "GET") -> bytes:
    auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
    return f"{method} {target} HTTP/1.1\r\nHost: gw\r\n{auth}Connection: close\r\n\r\n".encode()


@pytest.mark.parametrize(
    "path", ["/", "/admin", "/v1/unknown", "/echoes", "/ECHO/x", "/v1/chat/completions/extra"]
)
async def test_unknown_path_is_404_and_never_reaches_the_upstream(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    upstream: Upstream,
    path: str,
) -> None:
    issued = await make_key(scopes=["*"])
    for headers in ({}, bearer(issued.secret)):
        response = await http.post(f"{gateway.url}{path}", headers=headers, data=b"x")
        await assert_problem(response, 404, "not_found")
    assert upstream.hits == []
    assert gateway.mux.stats.commands == 0  # decided before any key lookup


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../admin",
        "/echo/../admin",
        "/echo/%2e%2e/secret",
        "/echo/%2E%2E/%2e%2E/secret",
        "/echo/.%2e/secret",
        "//admin",
        "//127.0.0.1/admin",
        "/echo/a%2Fb",
        "/echo/a%2fb",
        "/echo/..%2fsecret",
        "/echo/..%5csecret",
        "/echo/..%5Csecret",
        "/echo/..\\secret",
        "/echo/%00",
        "/echo/a%00b",
        "/echo/%0d%0aX-Injected:%20yes",
        "/echo/%7f",
        "/echo/%ff",
        "/echo/..",
        "/../echo/x",
        "/echo/../../echo/x",
        "http://evil.example/echo/x",  # absolute-form must not pick another host
    ],
)
async def test_traversal_and_encoded_separators_are_400_or_404_never_forwarded(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream, target: str
) -> None:
    issued = await make_key(scopes=["*"])
    response = await raw_http(gateway.port, _get(target, issued.secret))
    assert response.status in (400, 404), (target, response.status, response.body)
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert upstream.hits == []


@pytest.mark.parametrize("raw", [b"/echo/\x00", b"/echo/a\x00b", b"/echo/\x01", b"*", b"echo/x"])
async def test_request_targets_the_http_parser_refuses_are_400(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream, raw: bytes
) -> None:
    issued = await make_key(scopes=["*"])
    head = b"GET " + raw + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
    head += str(issued.secret).encode() + b"\r\nConnection: close\r\n\r\n"
    response = await raw_http(gateway.port, head)
    assert response.status == 400
    assert upstream.hits == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/echo/./a/./b", "/echo/a/b"),
        ("/echo//a///b", "/echo/a/b"),
        ("/echo/a/../b", "/echo/b"),
        ("/echo/a/%2e%2e/b", "/echo/b"),
        ("/echo/%252e%252e/secret", "/echo/%252e%252e/secret"),  # decoded once, not twice
        ("/echo/caf%C3%A9/a%20b", "/echo/caf%C3%A9/a%20b"),
        ("/echo/%41%42", "/echo/AB"),
    ],
)
async def test_the_upstream_gets_the_normalised_path(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream, target: str, forwarded: str
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    response = await raw_http(gateway.port, _get(target, issued.secret))
    assert response.status == 200, response.body
    assert [hit.raw_path for hit in upstream.hits] == [forwarded]


async def test_dot_segments_are_resolved_before_choosing_the_route(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream
) -> None:
    # /open needs no scope, /echo does: climbing out of /open must be judged as /echo.
    no_scopes = await make_key(scopes=[])
    for target in ("/open/../echo/x", "/open/%2e%2e/echo/x"):
        response = await raw_http(gateway.port, _get(target, no_scopes.secret))
        assert response.status == 403, (target, response.body)
    assert upstream.hits == []
    reader = await make_key(scopes=["echo:read"])
    response = await raw_http(gateway.port, _get("/open/../echo/x", reader.secret))
    assert response.status == 200
    assert [hit.raw_path for hit in upstream.hits] == ["/echo/x"]


async def test_method_not_in_the_route_is_405_with_allow(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=["*"])
    for method, path, allow in (
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/models", "GET"),
        ("PUT", "/hello", "GET"),
    ):
        for headers in ({}, bearer(issued.secret)):
            response = await http.request(method, f"{gateway.url}{path}", headers=headers)
            await assert_problem(response, 405, "method_not_allowed")
            assert response.headers["Allow"] == allow
    assert upstream.hits == []
    await echoed(await http.get(f"{gateway.url}/hello", headers=bearer(issued.secret)))
