"""Keys minted through a dialect hold no cap looser than their creator's remaining allowance
(docs/dialects.md, "Caps of minted keys"): Langflow's children inherit what is left,
OpenRouter's ``limit`` above it is refused in OpenRouter's error shape, and a creator with
``apikeys:*`` is exempt. Spend goes through the real proxy, on a fixed clock at noon."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
from redis.asyncio import Redis

from gateway.store.keystore import Issued, KeyStore
from gateway.store.record import SpendCap
from gateway.usage.periods import FixedClock, to_ms
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (  # noqa: F401  (fixtures)
    Gateway,
    StartGateway,
    cost_upstream_url,
    serve_app,
)

NOON = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
LANGFLOW, OPENROUTER = "/api/v1/api_key/", "/api/v1/keys"
CENT = 10_000  # micro-units: what one request to /c/cent costs
MINTER = ["apikeys:view", "apikeys:create", "apikeys:update", "chat:invoke"]


async def capped_gateway(
    start_gateway: StartGateway,
    cost_upstream_url: str,  # noqa: F811
    store: KeyStore,
) -> Gateway:
    """A gateway with every dialect and one route that costs 0.01 (reserved up front, so a
    cap admits exactly what it covers); the store's clock is the gateway's."""
    clock = FixedClock(to_ms(NOON))
    store.clock = clock
    route = {
        "name": "cent",
        "path": "/c/cent",
        "upstream": "costs",
        "rewrite": "/flat",
        "cost": {"fixed": CENT / 1_000_000},
    }
    return await start_gateway(
        routes=[route], upstreams={"costs": {"url": cost_upstream_url}}, clock=clock
    )


async def spend(gateway: Gateway, http: aiohttp.ClientSession, secret: str, tries: int) -> int:
    """Requests admitted (0.01 each) out of ``tries``; every other one must be 402."""
    admitted = 0
    for _ in range(tries):
        async with http.get(f"{gateway.url}/c/cent", headers=bearer(secret)) as response:
            assert response.status in (200, 402), await response.text()
            admitted += response.status == 200
    await gateway.proxy.settlements.drain()
    return admitted


async def daily_usage(redis: Redis, store: KeyStore, key_id: str) -> int:
    return int(await redis.get(store.names.usage(key_id, "d:20261118")) or 0)


async def langflow_mint(gateway: Gateway, http: aiohttp.ClientSession, creator: Issued) -> str:
    """A new key through Langflow's POST; returns its secret."""
    assert creator.secret is not None
    headers = {"x-api-key": creator.secret}
    async with http.post(f"{gateway.url}{LANGFLOW}", headers=headers, json={}) as response:
        assert response.status == 200, await response.text()
        secret: str = (await response.json())["api_key"]
    return secret


async def test_defect_c_children_minted_through_langflow_spend_only_what_is_left(
    start_gateway: StartGateway,
    cost_upstream_url: str,  # noqa: F811
    store: KeyStore,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: Redis,
) -> None:
    """The issue's defect (c): a key with 0.05/day and apikeys:create minted three children
    through Langflow that spent 0.20 in a day. Now the day's spend stays at 0.05."""
    gateway = await capped_gateway(start_gateway, cost_upstream_url, store)
    parent = await make_key(scopes=MINTER, limit_micro=5 * CENT, limit_reset="daily")
    assert parent.secret is not None
    assert await spend(gateway, http, parent.secret, 6) == 5  # its own 0.05, then 402
    children = [await langflow_mint(gateway, http, parent) for _ in range(3)]
    for child in children:
        assert await spend(gateway, http, child, 6) == 0
    ids = [parent.record.id]
    for child in children:
        found = await store.authenticate(child)
        assert found.record is not None
        ids.append(found.record.id)
    spent = [await daily_usage(redis, store, key_id) for key_id in ids]
    assert spent == [5 * CENT, 0, 0, 0]


async def test_a_langflow_child_inherits_the_creators_remaining_allowance_per_period(
    start_gateway: StartGateway,
    cost_upstream_url: str,  # noqa: F811
    store: KeyStore,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await capped_gateway(start_gateway, cost_upstream_url, store)
    parent = await make_key(
        scopes=MINTER,
        limit_micro=5 * CENT,
        limit_reset="daily",
        spend_caps=(SpendCap(20 * CENT, "monthly"), SpendCap(4 * CENT, "daily")),
    )
    assert parent.secret is not None
    assert await spend(gateway, http, parent.secret, 3) == 3  # 0.03 of the day's 0.04
    child_secret = await langflow_mint(gateway, http, parent)
    found = await store.authenticate(child_secret)
    assert found.record is not None
    child = found.record
    # The tightest daily cap's room (0.04 - 0.03), and the monthly room (0.20 - 0.03).
    assert (child.limit_micro, child.limit_reset) == (1 * CENT, "daily")
    assert child.spend_caps == (SpendCap(17 * CENT, "monthly"),)
    assert await spend(gateway, http, child_secret, 3) == 1


async def test_an_apikeys_star_creator_is_exempt_through_langflow(
    start_gateway: StartGateway,
    cost_upstream_url: str,  # noqa: F811
    store: KeyStore,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await capped_gateway(start_gateway, cost_upstream_url, store)
    parent = await make_key(
        scopes=["apikeys:*", "chat:invoke"], limit_micro=5 * CENT, limit_reset="daily"
    )
    assert parent.secret is not None
    assert await spend(gateway, http, parent.secret, 5) == 5
    child_secret = await langflow_mint(gateway, http, parent)
    found = await store.authenticate(child_secret)
    assert found.record is not None
    # Its creator's own caps, whole, as before this rule.
    assert (found.record.limit_micro, found.record.limit_reset) == (5 * CENT, "daily")


# --- OpenRouter ----------------------------------------------------------------------------


async def openrouter(
    http: aiohttp.ClientSession, method: str, url: str, secret: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, headers=bearer(secret), json=body) as response:
        return response.status, await response.json()


async def test_openrouter_limit_above_the_allowance_is_403_in_openrouters_shape(
    start_gateway: StartGateway,
    cost_upstream_url: str,  # noqa: F811
    store: KeyStore,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await capped_gateway(start_gateway, cost_upstream_url, store)
    parent = await make_key(scopes=MINTER, limit_micro=5 * CENT, limit_reset="daily")
    assert parent.secret is not None
    assert await spend(gateway, http, parent.secret, 2) == 2  # 0.03 left today
    url = f"{gateway.url}{OPENROUTER}"
    before = await store.count("ws-a")
    status, body = await openrouter(
        http, "POST", url, parent.secret, {"name": "x", "limit": 0.5, "limit_reset": "daily"}
    )
    assert (status, set(body)) == (403, {"error"})
    assert body["error"]["code"] == 403
    assert body["error"]["message"].startswith("limit: ")
    assert "remaining daily allowance is 0.03" in body["error"]["message"]
    assert await store.count("ws-a") == before  # nothing was created

    # Within the allowance: accepted as asked. Without a limit: the allowance, as limit.
    status, body = await openrouter(
        http, "POST", url, parent.secret, {"name": "y", "limit": 0.02, "limit_reset": "daily"}
    )
    assert status == 201, body
    assert (body["data"]["limit"], body["data"]["limit_reset"]) == (0.02, "daily")
    status, body = await openrouter(http, "POST", url, parent.secret, {"name": "z"})
    assert status == 201, body
    assert (body["data"]["limit"], body["data"]["limit_reset"]) == (0.03, "daily")
    assert body["data"]["limit_remaining"] == 0.03
    child_hash, child_secret = body["data"]["hash"], body["key"]

    # PATCH cannot raise it past the allowance either, nor drop it.
    one = f"{url}/{child_hash}"
    status, body = await openrouter(http, "PATCH", one, parent.secret, {"limit": 1})
    assert status == 403 and body["error"]["message"].startswith("limit: ")
    status, body = await openrouter(
        http, "PATCH", one, parent.secret, {"limit": None, "limit_reset": None}
    )
    assert status == 200, body
    # Dropping the limit leaves the allowance as an extra cap: still 0.03 a day.
    found = await store.authenticate(child_secret)
    assert found.record is not None
    assert found.record.limit_micro is None
    assert found.record.spend_caps == (SpendCap(3 * CENT, "daily"),)
    assert await spend(gateway, http, child_secret, 5) == 3


async def test_openrouter_create_by_an_apikeys_star_creator_is_exempt(
    start_gateway: StartGateway,
    cost_upstream_url: str,  # noqa: F811
    store: KeyStore,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await capped_gateway(start_gateway, cost_upstream_url, store)
    parent = await make_key(scopes=["apikeys:*"], limit_micro=5 * CENT, limit_reset="daily")
    assert parent.secret is not None
    status, body = await openrouter(
        http,
        "POST",
        f"{gateway.url}{OPENROUTER}",
        parent.secret,
        {"name": "big", "limit": 100},
    )
    assert status == 201, body
    assert (body["data"]["limit"], body["data"]["limit_reset"]) == (100, None)
