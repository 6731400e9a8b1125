"""A real nginx (deploy/forward-auth/nginx.conf, as shipped) asking keygate's auth listener
through auth_request, in front of the demo upstream: what a client sees through it, allowed
and refused; and the ingress-nginx manifest beside it."""

from __future__ import annotations

import asyncio
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
from tests.forward_auth.nginx_harness import CONFIG, INGRESS, Nginx, start_nginx, stop_nginx
from tests.proxy.conftest import Upstream

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
    {
        "name": "models",
        "prefix": "/echo/models",
        "upstream": "demo",
        "resource": {"path_segment": 2},
    },
]

Through = Callable[[AuthGateway], Awaitable[Nginx]]


@pytest.fixture
async def through_nginx(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Through]:
    """``await through_nginx(gw)``: an nginx in front of the demo upstream asking ``gw``;
    each one started is stopped (by its PID) at teardown."""
    started: list[Nginx] = []

    async def start(gw: AuthGateway) -> Nginx:
        nginx = await start_nginx(
            tmp_path / f"nginx{len(started)}",
            keygate_auth=f"127.0.0.1:{gw.port}",
            upstream=f"127.0.0.1:{upstream.port}",
        )
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        stop_nginx(nginx)


async def usage(redis: Redis, key_prefix: str, key_id: str) -> int:
    return int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)


def received(echo: dict[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` the upstream received, as the echo reports them."""
    return [value for key, value in echo["header_list"] if key.lower() == name.lower()]


def assert_refused(response: aiohttp.ClientResponse, status: int, meant: int, reason: str) -> None:
    """nginx's own refusal page, with keygate's status and code in headers for the client."""
    assert response.status == status
    assert response.headers["X-Keygate-Status"] == str(meant)
    assert response.headers["X-Keygate-Deny-Reason"] == reason


async def test_200_the_upstream_gets_keygates_identity_headers_never_the_clients(
    start_auth: StartAuth,
    through_nginx: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    issued = await make_key(scopes=["echo:read"], workspace_id="ws-n")
    forged = {"X-Keygate-Key-Id": "someone-else", "X-Keygate-Scopes": "admin"}
    async with http.post(
        f"{nginx.url}/echo/a?b=1", headers={**bearer(issued.secret), **forged}, data=b"hello"
    ) as response:
        assert response.status == 200, await response.text()
        echo = await response.json()
        assert "X-Keygate-Status" not in response.headers
        assert "X-Keygate-Deny-Reason" not in response.headers
    assert (echo["method"], echo["path"]) == ("POST", "/echo/a")
    assert received(echo, "X-Keygate-Key-Id") == [issued.record.id]
    assert received(echo, "X-Keygate-Workspace-Id") == ["ws-n"]
    assert received(echo, "X-Keygate-Scopes") == ["echo:read"]
    (request_id,) = received(echo, "X-Keygate-Request-Id")
    assert request_id.startswith(issued.record.id + ".")
    assert received(echo, "Authorization") == []  # the key stays at nginx
    assert [(hit.method, hit.raw_path) for hit in upstream.hits] == [("POST", "/echo/a?b=1")]


async def test_200_keygate_judges_the_request_nginx_got_not_what_the_client_claims(
    start_auth: StartAuth,
    through_nginx: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    issued = await make_key(scopes=["echo:read"], resources=["m1"])
    key = bearer(issued.secret)
    async with http.get(f"{nginx.url}/echo/models/m1", headers=key) as response:
        assert response.status == 200
    # nginx.conf sets X-Original-URI itself and removes X-Keygate-Resource.
    claims = {"X-Original-URI": "/echo/models/m1", "X-Keygate-Resource": "m1"}
    async with http.get(f"{nginx.url}/echo/models/m2", headers={**key, **claims}) as response:
        assert_refused(response, 403, 403, "forbidden_resource")
    assert [hit.raw_path for hit in upstream.hits] == ["/echo/models/m1"]


async def test_401_without_a_key_or_with_a_bad_one_with_www_authenticate(
    start_auth: StartAuth,
    through_nginx: Through,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    async with http.get(f"{nginx.url}/echo/x") as response:
        assert_refused(response, 401, 401, "missing_key")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(f"{nginx.url}/echo/x", headers=bearer("kg_not_a_key")) as response:
        assert_refused(response, 401, 401, "invalid_key")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.hits == []


async def test_403_a_key_without_the_routes_scope(
    start_auth: StartAuth,
    through_nginx: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    issued = await make_key(scopes=["other"])
    async with http.get(f"{nginx.url}/echo/x", headers=bearer(issued.secret)) as response:
        assert_refused(response, 403, 403, "forbidden_scope")
    assert upstream.hits == []


async def test_403_for_a_path_no_keygate_route_serves(
    start_auth: StartAuth,
    through_nginx: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{nginx.url}/elsewhere", headers=bearer(issued.secret)) as response:
        assert_refused(response, 403, 404, "not_found")
    assert upstream.hits == []


async def test_403_carrying_429_then_402_with_retry_after(
    start_auth: StartAuth,
    through_nginx: Through,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    limited = await make_key(scopes=["echo:read"], rate_limit=RateLimitSpec(2, 60))
    for _ in range(2):
        async with http.get(f"{nginx.url}/echo/x", headers=bearer(limited.secret)) as response:
            assert response.status == 200
            assert response.headers["RateLimit-Policy"] == '"key";q=2;w=60'
    async with http.get(f"{nginx.url}/echo/x", headers=bearer(limited.secret)) as response:
        assert_refused(response, 403, 429, "rate_limited")
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert response.headers["RateLimit-Policy"] == '"key";q=2;w=60'
        assert "r=0" in response.headers["RateLimit"]

    capped = await make_key(scopes=["echo:read"], limit_micro=3 * COST_MICRO, limit_reset="daily")
    for _ in range(3):
        async with http.get(f"{nginx.url}/echo/x", headers=bearer(capped.secret)) as response:
            assert response.status == 200
    async with http.get(f"{nginx.url}/echo/x", headers=bearer(capped.secret)) as response:
        assert_refused(response, 403, 402, "spend_limited")
        assert int(response.headers["Retry-After"]) >= 1
    assert len(upstream.hits) == 2 + 3


async def test_401_on_the_very_next_request_after_revocation(
    start_auth: StartAuth,
    through_nginx: Through,
    make_key: MakeKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    issued = await make_key(scopes=["echo:read"])
    async with http.get(f"{nginx.url}/echo/x", headers=bearer(issued.secret)) as response:
        assert response.status == 200
    await store.revoke(issued.record.id)
    async with http.get(f"{nginx.url}/echo/x", headers=bearer(issued.secret)) as response:
        assert response.status == 401, await response.text()
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_spending_cap_is_exact_under_200_concurrent_requests(
    start_auth: StartAuth,
    through_nginx: Through,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    upstream: Upstream,
) -> None:
    gw = await start_auth(routes=ROUTES)
    nginx = await through_nginx(gw)
    covered = 37
    issued = await make_key(
        scopes=["echo:read"], limit_micro=covered * COST_MICRO, limit_reset="daily"
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as http:

        async def one() -> tuple[int, str | None]:
            async with http.get(f"{nginx.url}/echo/x", headers=bearer(issued.secret)) as response:
                await response.read()
                return response.status, response.headers.get("X-Keygate-Status")

        answers = await asyncio.gather(*(one() for _ in range(200)))
    assert answers.count((200, None)) == covered
    assert answers.count((403, "402")) == 200 - covered
    assert len(upstream.hits) == covered
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == covered * COST_MICRO


# --- the shipped files themselves ---------------------------------------------------------


def test_the_nginx_config_names_its_placeholders_at_its_top() -> None:
    text = CONFIG.read_text(encoding="utf-8")
    header = text.split("worker_processes", 1)[0]
    for placeholder in ("__LISTEN__", "__KEYGATE_AUTH__", "__UPSTREAM__"):
        assert placeholder in header
        assert placeholder in text.split("worker_processes", 1)[1]


def test_the_ingress_nginx_manifest_asks_keygate_and_passes_the_identity_on() -> None:
    documents = [d for d in yaml.safe_load_all(INGRESS.read_text()) if d is not None]
    kinds = {d["kind"]: d for d in documents}
    assert sorted(kinds) == ["ConfigMap", "Ingress", "Service"]
    ingress = kinds["Ingress"]
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    service = kinds["Service"]
    (port,) = service["spec"]["ports"]
    url = annotations[prefix + "auth-url"]
    assert url.startswith(f"http://{service['metadata']['name']}.")
    assert url.endswith(f".svc.cluster.local:{port['port']}/auth/nginx")
    # ingress-nginx sends X-Original-URI only when auth-method is set.
    assert annotations[prefix + "auth-method"] == "GET"
    assert annotations[prefix + "auth-response-headers"].split(",") == IDENTITY
    headers = kinds["ConfigMap"]
    assert annotations[prefix + "auth-proxy-set-headers"] == headers["metadata"]["name"]
    assert headers["data"] == {"X-Keygate-Resource": ""}
    assert int(annotations[prefix + "auth-keepalive"]) > 0
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"]["name"] != service["metadata"]["name"]
