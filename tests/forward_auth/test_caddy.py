"""Caddy in front of the demo upstream, asking keygate with ``forward_auth``: the shipped
deploy/forward-auth/Caddyfile, a real ``caddy`` process, keygate's real auth listener.
Caddy relays keygate's refusals as they are (status, headers, RFC 9457 body)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.store.keystore import KeyStore
from gateway.store.record import RateLimitSpec
from tests.conftest import MakeKey, bearer
from tests.forward_auth.caddy_harness import Caddy, start_caddy, stop_caddy
from tests.forward_auth.conftest import AuthGateway, StartAuth
from tests.proxy.conftest import Upstream, assert_problem

COST = 0.01
COST_MICRO = 10_000
ROUTES: list[dict[str, Any]] = [
    {"name": "open", "path": "/echo/open", "upstream": "demo"},  # no scope, no cost
    {
        "name": "echo",
        "prefix": "/echo",
        "upstream": "demo",
        "scopes": ["echo:read"],
        "cost": {"fixed": COST},
    },
]
IDENTITY = ("x-keygate-key-id", "x-keygate-workspace-id", "x-keygate-scopes")

InFront = Callable[[AuthGateway], Awaitable[Caddy]]


@pytest.fixture
async def caddy_in_front(tmp_path: Path, upstream: Upstream) -> AsyncIterator[InFront]:
    """``await caddy_in_front(gw)``: Caddy asking ``gw``, stopped at teardown."""
    started: list[Caddy] = []

    async def start(gw: AuthGateway) -> Caddy:
        caddy = await start_caddy(
            tmp_path / f"caddy{len(started)}",
            keygate_auth=f"127.0.0.1:{gw.port}",
            upstream_url=upstream.url,
        )
        started.append(caddy)
        return caddy

    yield start
    for caddy in started:
        stop_caddy(caddy)


async def usage(redis: Redis, key_prefix: str, key_id: str) -> int:
    return int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)


def received(echoed: dict[str, Any]) -> dict[str, list[str]]:
    """The headers the upstream echoed, by lower-cased name."""
    found: dict[str, list[str]] = {}
    for name, value in echoed["header_list"]:
        found.setdefault(name.lower(), []).append(value)
    return found


async def test_200_carries_keygate_identity_and_never_a_forged_one(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    issued = await make_key(scopes=["echo:read"], workspace_id="ws-caddy")
    forged = {
        "X-Keygate-Key-Id": "forged",
        "X-Keygate-Workspace-Id": "forged",
        "X-Keygate-Scopes": "admin",
        "X-Keygate-Request-Id": "forged",
        "X_Keygate_Key_Id": "forged",
    }
    async with http.post(
        f"{caddy.url}/echo/a?b=1",
        headers={**bearer(issued.secret), **forged},
        json={"model": "m"},
    ) as response:
        assert response.status == 200, await response.text()
        echoed = await response.json()
    # Caddy asks keygate with GET and no body; the upstream still gets the client's.
    assert echoed["method"] == "POST" and echoed["body"] == '{"model": "m"}'
    assert echoed["path"] == "/echo/a" and echoed["query"] == {"b": "1"}
    headers = received(echoed)
    assert headers["x-keygate-key-id"] == [issued.record.id]
    assert headers["x-keygate-workspace-id"] == ["ws-caddy"]
    assert headers["x-keygate-scopes"] == ["echo:read"]
    (request_id,) = headers["x-keygate-request-id"]
    assert request_id.startswith(f"{issued.record.id}.")
    assert "x_keygate_key_id" not in headers
    # The secret stays between the client, Caddy and keygate.
    assert "authorization" not in headers

    # A route that holds nothing: keygate's 200 has no X-Keygate-Request-Id, and the
    # client's forged one still does not get through.
    async with http.get(
        f"{caddy.url}/echo/open", headers={**bearer(issued.secret), **forged}
    ) as response:
        assert response.status == 200, await response.text()
        headers = received(await response.json())
    assert headers["x-keygate-key-id"] == [issued.record.id]
    assert headers.get("x-keygate-request-id", [""]) == [""]


async def test_401_relays_www_authenticate(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    async with http.get(f"{caddy.url}/echo/a") as response:
        await assert_problem(response, 401, "missing_key")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(f"{caddy.url}/echo/a", headers=bearer("kg_not_a_key")) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.hits == []


async def test_403_missing_scope_even_when_the_client_names_another_request(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    issued = await make_key(scopes=["other:read"])
    # Caddy sets X-Forwarded-Method/-Uri itself: keygate judges /echo/a, not /echo/open.
    claims = {"X-Forwarded-Uri": "/echo/open", "X-Forwarded-Method": "GET"}
    async with http.post(
        f"{caddy.url}/echo/a", headers={**bearer(issued.secret), **claims}
    ) as response:
        await assert_problem(response, 403, "forbidden_scope")
    assert upstream.hits == []


async def test_404_for_a_path_no_keygate_route_serves(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{caddy.url}/nowhere", headers=bearer(issued.secret)) as response:
        assert response.status == 404
    assert upstream.hits == []


async def test_429_relays_retry_after_and_ratelimit(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    issued = await make_key(scopes=["echo:read"], rate_limit=RateLimitSpec(2, 60))
    for _ in range(2):
        async with http.get(f"{caddy.url}/echo/a", headers=bearer(issued.secret)) as response:
            assert response.status == 200
    async with http.get(f"{caddy.url}/echo/a", headers=bearer(issued.secret)) as response:
        await assert_problem(response, 429, "rate_limited")
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers["RateLimit-Policy"] == '"key";q=2;w=60'
        assert "r=0" in response.headers["RateLimit"]
    assert len(upstream.hits) == 2


async def test_402_names_the_spending_cap(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    issued = await make_key(scopes=["echo:read"], limit_micro=3 * COST_MICRO, limit_reset="daily")
    for _ in range(3):
        async with http.get(f"{caddy.url}/echo/a", headers=bearer(issued.secret)) as response:
            assert response.status == 200
    async with http.get(f"{caddy.url}/echo/a", headers=bearer(issued.secret)) as response:
        body = await assert_problem(response, 402, "spend_limited")
        assert int(response.headers["Retry-After"]) >= 1
    assert body["cap"]["name"] == "limit"
    assert body["cap"]["period"] == "daily"
    assert body["cap"]["amount"] == pytest.approx(3 * COST)
    assert "daily limit of 0.03 is used up" in body["detail"]
    assert len(upstream.hits) == 3
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == 3 * COST_MICRO


async def test_a_revoked_key_is_refused_on_the_very_next_request(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    make_key: MakeKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{caddy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 200
    assert await store.revoke(issued.record.id)
    async with http.get(f"{caddy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_spending_cap_is_exact_under_200_concurrent_requests(
    start_auth: StartAuth,
    caddy_in_front: InFront,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    covered = 37
    gw = await start_auth(routes=ROUTES)
    caddy = await caddy_in_front(gw)
    issued = await make_key(
        scopes=["echo:read"], limit_micro=covered * COST_MICRO, limit_reset="daily"
    )
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def one() -> int:
            async with session.get(
                f"{caddy.url}/echo/a", headers=bearer(issued.secret)
            ) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    # Which status was neither, and what the proxy logged of it:
    assert Counter(statuses) == {200: covered, 402: 200 - covered}, caddy.output()[-3000:]
    assert len(upstream.hits) == covered
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == covered * COST_MICRO
