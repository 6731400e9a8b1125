"""The auth listener's contracts, asked the way each proxy asks (the proxies themselves are
in the test_<proxy>.py files): allow with identity headers, refusals in each caller's
shape, settlement through POST /v1/usage, and POST /v1/verify."""

from __future__ import annotations

import urllib.error
import urllib.request
from decimal import ROUND_HALF_UP
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from genai_prices import Usage, calc_price
from redis.asyncio import Redis

from gateway.store.record import MICRO, RateLimitSpec
from tests.conftest import MakeKey, bearer
from tests.forward_auth.conftest import AuthGateway, StartAuth
from tests.procs import embedded_config, free_port, serving, write_config

ROUTES: list[dict[str, Any]] = [
    {
        "name": "echo",
        "prefix": "/echo",
        "upstream": "demo",
        "scopes": ["echo:read"],
        "cost": {"fixed": 0.01},
    },
    {
        "name": "metered",
        "prefix": "/metered",
        "upstream": "demo",
        "scopes": ["echo:read"],
        "cost": {"header": "X-Usage-Cost"},
        "reserve": 0.5,
    },
    {"name": "models", "prefix": "/models", "upstream": "demo", "resource": {"path_segment": 1}},
    {
        "name": "named",
        "prefix": "/named",
        "upstream": "demo",
        "resource": {"header": "X-Keygate-Resource"},
    },
]


async def usage(redis: Redis, key_prefix: str, key_id: str) -> int:
    return int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)


async def check(
    http: aiohttp.ClientSession,
    gw: AuthGateway,
    caller: str,
    method: str,
    target: str,
    headers: dict[str, str],
) -> aiohttp.ClientResponse:
    if caller == "nginx":
        url, sent = f"{gw.url}/auth/nginx", {"X-Original-Method": method, "X-Original-URI": target}
        method = "GET"
    elif caller == "envoy":
        url, sent = f"{gw.url}/auth/envoy{target}", {}
    else:
        url, sent = (
            f"{gw.url}/auth/{caller}",
            {"X-Forwarded-Method": method, "X-Forwarded-Uri": target},
        )
    async with http.request(method, url, headers={**sent, **headers}) as response:
        await response.read()
        return response


async def test_each_caller_is_allowed_with_the_identity_headers(
    start_auth: StartAuth,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"], workspace_id="ws-f")
    for caller in ("nginx", "traefik", "caddy", "envoy"):
        response = await check(http, gw, caller, "GET", "/echo/a?b=1", bearer(issued.secret))
        assert response.status == 200, caller
        assert response.headers["X-Keygate-Key-Id"] == issued.record.id
        assert response.headers["X-Keygate-Workspace-Id"] == "ws-f"
        assert response.headers["X-Keygate-Scopes"] == "echo:read"
        assert response.headers["X-Keygate-Request-Id"].startswith(issued.record.id + ".")
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == 4 * MICRO // 100  # fixed cost


async def test_refusals_are_relayed_and_nginx_gets_them_as_403_with_the_real_status(
    start_auth: StartAuth, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"], rate_limit=RateLimitSpec(1, 60))
    assert (await check(http, gw, "traefik", "GET", "/echo/x", bearer(issued.secret))).status == 200
    limited = await check(http, gw, "traefik", "GET", "/echo/x", bearer(issued.secret))
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["RateLimit-Policy"] == '"key";q=1;w=60'
    mapped = await check(http, gw, "nginx", "GET", "/echo/x", bearer(issued.secret))
    assert mapped.status == 403
    assert mapped.headers["X-Keygate-Status"] == "429"
    assert mapped.headers["X-Keygate-Deny-Reason"] == "rate_limited"
    assert "Retry-After" in mapped.headers
    missing = await check(http, gw, "nginx", "GET", "/echo/x", {})
    assert missing.status == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    scoped = await make_key(scopes=["other"])
    refused = await check(http, gw, "caddy", "GET", "/echo/x", bearer(scoped.secret))
    assert refused.status == 403
    unrouted = await check(http, gw, "nginx", "GET", "/nowhere", bearer(scoped.secret))
    assert (unrouted.status, unrouted.headers["X-Keygate-Status"]) == (403, "404")


async def test_a_check_without_the_original_request_names_the_missing_header(
    start_auth: StartAuth, http: aiohttp.ClientSession
) -> None:
    gw = await start_auth(routes=ROUTES)
    async with http.get(f"{gw.url}/auth/traefik") as response:
        assert response.status == 400
        body = await response.json(content_type=None)
    assert "X-Forwarded-Method and X-Forwarded-Uri" in body["detail"]


async def test_the_proxy_may_name_the_resource(
    start_auth: StartAuth, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(resources=["m1"])
    key = bearer(issued.secret)
    assert (await check(http, gw, "envoy", "GET", "/models/m1", key)).status == 200
    assert (await check(http, gw, "envoy", "GET", "/models/m2", key)).status == 403
    # A route that reads the resource from the path ignores the header a client may send.
    claimed = {**key, "X-Keygate-Resource": "m1"}
    assert (await check(http, gw, "envoy", "GET", "/models/m2", claimed)).status == 403
    # A route that reads it from a header (one the proxy in front sets) uses it.
    assert (await check(http, gw, "nginx", "GET", "/named/x", claimed)).status == 200
    other = {**key, "X-Keygate-Resource": "m2"}
    assert (await check(http, gw, "nginx", "GET", "/named/x", other)).status == 403


async def test_a_reservation_is_settled_by_a_usage_report_once(
    start_auth: StartAuth,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reporter = await make_key(scopes=["keys:verify"])
    allowed = await check(http, gw, "caddy", "POST", "/metered/run", bearer(issued.secret))
    token = allowed.headers["X-Keygate-Request-Id"]
    assert await usage(redis, key_prefix, issued.record.id) == MICRO // 2  # reserved
    report = {"request_id": token, "cost": 0.125}
    async with http.post(f"{gw.url}/v1/usage", json=report) as response:
        assert response.status == 401
    async with http.post(
        f"{gw.url}/v1/usage", json=report, headers=bearer(issued.secret)
    ) as response:
        assert response.status == 403  # no keys:verify
    for settled in (True, False):
        async with http.post(
            f"{gw.url}/v1/usage", json=report, headers=bearer(reporter.secret)
        ) as response:
            assert response.status == 200
            assert await response.json() == {
                "request_id": token,
                "charged": 0.125,
                "settled": settled,
            }
    assert await usage(redis, key_prefix, issued.record.id) == MICRO // 8
    async with http.post(
        f"{gw.url}/v1/usage", json={"request_id": token}, headers=bearer(reporter.secret)
    ) as response:
        assert response.status == 400
        assert "exactly one of cost or usage" in (await response.json(content_type=None))["detail"]


async def test_verify_answers_for_application_code(
    start_auth: StartAuth,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_auth(routes=ROUTES)
    verifier = await make_key(scopes=["keys:verify"])
    issued = await make_key(scopes=["echo:read"], limit_micro=MICRO, limit_reset="daily")
    body = {"key": issued.secret, "method": "GET", "path": "/echo/x", "cost": 0.25}
    async with http.post(
        f"{gw.url}/v1/verify", json=body, headers=bearer(verifier.secret)
    ) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["valid"] is True and answer["code"] == "ok"
    assert (answer["key_id"], answer["scopes"]) == (issued.record.id, ["echo:read"])
    assert answer["request_id"]
    await gw.proxy.settlements.drain()
    assert await usage(redis, key_prefix, issued.record.id) == MICRO // 4
    body = {"key": issued.secret, "route": "echo", "cost": 0.9}
    async with http.post(
        f"{gw.url}/v1/verify", json=body, headers=bearer(verifier.secret)
    ) as response:
        refused = await response.json()
    assert (refused["valid"], refused["code"], refused["remaining"]) == (
        False,
        "spend_limited",
        0.75,
    )
    body = {"key": "kg_nope", "route": "echo"}
    async with http.post(
        f"{gw.url}/v1/verify", json=body, headers=bearer(verifier.secret)
    ) as response:
        unknown = await response.json()
    assert (unknown["valid"], unknown["code"], unknown["key_id"]) == (False, "invalid_key", None)


def test_keygate_serve_opens_the_auth_listener_only_when_asked(tmp_path: Path) -> None:
    auth_port = free_port()
    routes = [{"name": "echo", "prefix": "/echo", "upstream": "demo"}]
    upstreams = {"demo": {"url": "http://127.0.0.1:9"}}
    config = embedded_config(
        tmp_path, routes=routes, upstreams=upstreams, auth_listen=f"127.0.0.1:{auth_port}"
    )
    with serving(write_config(tmp_path / "gateway.yaml", config), tmp_path):
        # The route needs no scope but a key: an unknown one is a 401 in nginx's contract.
        request = urllib.request.Request(
            f"http://127.0.0.1:{auth_port}/auth/nginx",
            headers={
                "X-Original-Method": "GET",
                "X-Original-URI": "/echo/x",
                "Authorization": "Bearer not-a-key",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
    off = embedded_config(tmp_path, routes=routes, upstreams=upstreams)
    with serving(write_config(tmp_path / "off.yaml", off), tmp_path), pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{auth_port}/auth/nginx", timeout=2)


async def test_a_usage_block_is_priced_as_the_proxy_prices_it(
    start_auth: StartAuth,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reporter = await make_key(scopes=["keys:verify"])
    allowed = await check(http, gw, "traefik", "POST", "/metered/chat", bearer(issued.secret))
    token = allowed.headers["X-Keygate-Request-Id"]
    usage_block = {"model": "gpt-4o-mini", "input_tokens": 12_000, "output_tokens": 3_000}
    async with http.post(
        f"{gw.url}/v1/usage",
        json={"request_id": token, "usage": usage_block},
        headers=bearer(reporter.secret),
    ) as response:
        assert response.status == 200
        answer = await response.json()
    price = calc_price(Usage(input_tokens=12_000, output_tokens=3_000), "gpt-4o-mini")
    expected = int((price.total_price * MICRO).to_integral_value(ROUND_HALF_UP))
    assert answer["charged"] == expected / MICRO and answer["settled"] is True
    assert await usage(redis, key_prefix, issued.record.id) == expected
    unpriced = {"model": "house-model-7b", "input_tokens": 1, "output_tokens": 1}
    async with http.post(
        f"{gw.url}/v1/usage",
        json={"request_id": token, "usage": unpriced},
        headers=bearer(reporter.secret),
    ) as response:
        assert response.status == 403
        assert (await response.json(content_type=None))["code"] == "unpriced_model"
