"""A real Traefik (deploy/forward-auth/traefik.yml and traefik-dynamic.yml, as shipped)
asking keygate's auth listener through forwardAuth, in front of the demo upstream: what a
client sees through it, allowed and refused; and the Envoy Gateway manifest beside it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from gateway.store.keystore import KeyStore
from gateway.store.record import MICRO, RateLimitSpec
from tests.conftest import MakeKey, bearer
from tests.forward_auth.conftest import AuthGateway, StartAuth
from tests.forward_auth.traefik_harness import (
    DYNAMIC,
    FORWARD_AUTH,
    Traefik,
    start_traefik,
    stop_traefik,
)
from tests.proxy.conftest import Upstream, assert_problem

IDENTITY = [
    "X-Keygate-Key-Id",
    "X-Keygate-Workspace-Id",
    "X-Keygate-Scopes",
    "X-Keygate-Request-Id",
]
COST_MICRO = MICRO // 100  # the echo route's fixed cost, 0.01
ROUTES: list[dict[str, Any]] = [
    {
        "name": "echo",
        "prefix": "/echo",
        "upstream": "demo",
        "scopes": ["echo:read"],
        "cost": {"fixed": 0.01},
    },
]

Through = Callable[..., Awaitable[Traefik]]


@pytest.fixture
async def through_traefik(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Through]:
    """``await through_traefik(gw)``: a Traefik in front of the demo upstream asking ``gw``;
    each one started is stopped (by its PID) at teardown."""
    started: list[Traefik] = []

    async def start(gw: AuthGateway, *, forward_body: bool = False) -> Traefik:
        traefik = await start_traefik(
            tmp_path / f"traefik{len(started)}",
            keygate_auth=f"127.0.0.1:{gw.port}",
            upstream_url=upstream.url,
            forward_body=forward_body,
        )
        started.append(traefik)
        return traefik

    yield start
    for traefik in started:
        stop_traefik(traefik)


async def usage(redis: Redis, key_prefix: str, key_id: str) -> int:
    return int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)


def received(echo: dict[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` the upstream received, as the echo reports them."""
    return [value for key, value in echo["header_list"] if key.lower() == name.lower()]


async def test_200_the_upstream_gets_keygates_identity_headers_never_the_clients(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    issued = await make_key(scopes=["echo:read"], workspace_id="ws-t")
    forged = {"X-Keygate-Key-Id": "someone-else", "X-Keygate-Scopes": "admin"}
    async with http.get(
        f"{traefik.url}/echo/a?b=1", headers={**bearer(issued.secret), **forged}
    ) as response:
        assert response.status == 200, await response.text()
        echo = await response.json()
    assert (echo["method"], echo["path"]) == ("GET", "/echo/a")
    assert received(echo, "X-Keygate-Key-Id") == [issued.record.id]
    assert received(echo, "X-Keygate-Workspace-Id") == ["ws-t"]
    assert received(echo, "X-Keygate-Scopes") == ["echo:read"]
    (request_id,) = received(echo, "X-Keygate-Request-Id")
    assert request_id.startswith(issued.record.id + ".")
    assert [hit.raw_path for hit in upstream.hits] == ["/echo/a?b=1"]
    assert received(echo, "Authorization") == []  # the key stops at Traefik


async def test_200_with_the_key_in_x_api_key_which_stops_at_traefik_too(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    issued = await make_key(scopes=["echo:read"])
    assert issued.secret is not None
    async with http.post(
        f"{traefik.url}/echo/x", headers={"x-api-key": issued.secret}, data=b"{}"
    ) as response:
        assert response.status == 200, await response.text()
        echo = await response.json()
    assert echo["method"] == "POST" and echo["body"] == "{}"
    assert received(echo, "X-Keygate-Key-Id") == [issued.record.id]
    assert received(echo, "X-Api-Key") == []


async def test_200_a_forged_forwarded_uri_does_not_change_what_keygate_judges(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    routes = [*ROUTES, {"name": "admin", "prefix": "/admin", "upstream": "demo", "scopes": ["x"]}]
    gw = await start_auth(routes=routes)
    traefik = await through_traefik(gw)
    issued = await make_key(scopes=["echo:read"])
    # trustForwardHeader: false: Traefik names the request it got, not the client's claim.
    claim = {"X-Forwarded-Uri": "/echo/x", "X-Forwarded-Method": "GET"}
    async with http.post(
        f"{traefik.url}/admin/x", headers={**bearer(issued.secret), **claim}
    ) as response:
        await assert_problem(response, 403, "forbidden_scope")
    assert upstream.hits == []


async def test_200_and_403_on_a_resource_in_the_body_with_forward_body_on(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    route = {"name": "models", "prefix": "/echo", "upstream": "demo", "resource": {"json": "model"}}
    gw = await start_auth(routes=[route])
    traefik = await through_traefik(gw, forward_body=True)
    issued = await make_key(resources=["m1"])
    async with http.post(
        f"{traefik.url}/echo/chat", json={"model": "m1"}, headers=bearer(issued.secret)
    ) as response:
        assert response.status == 200, await response.text()
        echo = await response.json()
    assert echo["body"] == '{"model": "m1"}'  # the upstream still gets the whole body
    async with http.post(
        f"{traefik.url}/echo/chat", json={"model": "m2"}, headers=bearer(issued.secret)
    ) as response:
        await assert_problem(response, 403, "forbidden_resource")
    assert len(upstream.hits) == 1


async def test_401_without_a_key_with_www_authenticate(
    start_auth: StartAuth,
    through_traefik: Through,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    async with http.get(f"{traefik.url}/echo/x") as response:
        await assert_problem(response, 401, "missing_key")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(f"{traefik.url}/echo/x", headers=bearer("kg_not_a_key")) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.hits == []


async def test_403_a_key_without_the_routes_scope(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    issued = await make_key(scopes=["other"])
    async with http.get(f"{traefik.url}/echo/x", headers=bearer(issued.secret)) as response:
        await assert_problem(response, 403, "forbidden_scope")
    assert upstream.hits == []


async def test_404_a_path_no_keygate_route_serves(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{traefik.url}/nowhere", headers=bearer(issued.secret)) as response:
        await assert_problem(response, 404, "not_found")
    assert upstream.hits == []


async def test_429_then_402_are_relayed_with_their_headers_and_body(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    limited = await make_key(scopes=["echo:read"], rate_limit=RateLimitSpec(2, 60))
    for _ in range(2):
        async with http.get(f"{traefik.url}/echo/x", headers=bearer(limited.secret)) as response:
            assert response.status == 200
    async with http.get(f"{traefik.url}/echo/x", headers=bearer(limited.secret)) as response:
        await assert_problem(response, 429, "rate_limited")
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert response.headers["RateLimit-Policy"] == '"key";q=2;w=60'
        assert "r=0" in response.headers["RateLimit"]

    capped = await make_key(scopes=["echo:read"], limit_micro=30_000, limit_reset="daily")
    for _ in range(3):
        async with http.get(f"{traefik.url}/echo/x", headers=bearer(capped.secret)) as response:
            assert response.status == 200
    async with http.get(f"{traefik.url}/echo/x", headers=bearer(capped.secret)) as response:
        body = await assert_problem(response, 402, "spend_limited")
        assert int(response.headers["Retry-After"]) >= 1
    assert body["cap"]["name"] == "limit" and body["cap"]["period"] == "daily"
    assert body["cap"]["amount"] == 0.03
    assert "daily limit" in body["detail"]
    assert len(upstream.hits) == 2 + 3


async def test_401_on_the_very_next_request_after_revocation(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{traefik.url}/echo/x", headers=bearer(issued.secret)) as response:
        assert response.status == 200
    await store.revoke(issued.record.id)
    async with http.get(f"{traefik.url}/echo/x", headers=bearer(issued.secret)) as response:
        assert response.status == 401, await response.text()
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_spending_cap_is_exact_under_200_concurrent_requests(
    start_auth: StartAuth,
    through_traefik: Through,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    traefik = await through_traefik(gw)
    covered = 37
    issued = await make_key(
        scopes=["echo:read"], limit_micro=covered * COST_MICRO, limit_reset="daily"
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as http:

        async def one() -> int:
            async with http.get(f"{traefik.url}/echo/x", headers=bearer(issued.secret)) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    # Which status was neither, and what the proxy logged of it:
    assert Counter(statuses) == {200: covered, 402: 200 - covered}, traefik.output()[-3000:]
    assert len(upstream.hits) == covered
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == covered * COST_MICRO


# --- Kubernetes Gateway API: Envoy Gateway's SecurityPolicy ------------------------------


def test_the_envoy_gateway_manifest_asks_keygate_and_passes_the_identity_on() -> None:
    documents = [
        d
        for d in yaml.safe_load_all((FORWARD_AUTH / "envoy-gateway.yaml").read_text())
        if d is not None
    ]
    kinds = {d["kind"]: d for d in documents}
    assert sorted(kinds) == ["HTTPRoute", "SecurityPolicy", "Service"]
    assert kinds["HTTPRoute"]["apiVersion"] == "gateway.networking.k8s.io/v1"
    policy = kinds["SecurityPolicy"]
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    (target,) = policy["spec"]["targetRefs"]
    assert (target["kind"], target["name"]) == ("HTTPRoute", kinds["HTTPRoute"]["metadata"]["name"])
    ext_auth = policy["spec"]["extAuth"]
    assert ext_auth["failOpen"] is False
    # Envoy Gateway sends an HTTP authorizer only Authorization by default: the other
    # credential header and the resource header must be named.
    assert {"authorization", "x-api-key", "x-keygate-resource"} <= set(ext_auth["headersToExtAuth"])
    http_service = ext_auth["http"]
    assert http_service["path"] == "/auth/envoy"
    (backend,) = http_service["backendRefs"]
    service = kinds["Service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"] in [port["port"] for port in service["spec"]["ports"]]
    assert [h.lower() for h in http_service["headersToBackend"]] == [h.lower() for h in IDENTITY]
    # The same identity headers Traefik copies upstream.
    dynamic = yaml.safe_load(DYNAMIC.read_text())
    forward_auth = dynamic["http"]["middlewares"]["keygate-auth"]["forwardAuth"]
    assert forward_auth["authResponseHeaders"] == IDENTITY
