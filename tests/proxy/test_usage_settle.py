"""Settling: after the response the actual cost replaces the reservation, from a fixed
rule, a response header (hidden from the client), a JSON body or the last SSE event
carrying the path; upstream failures are refunded unless the route charges them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.store.keystore import Issued, KeyStore
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway


class Usage:
    def __init__(self, redis: Redis, prefix: str, key_id: str) -> None:
        self.redis, self.prefix, self.key_id = redis, prefix, key_id

    async def total(self, byok: bool = False) -> int:
        name = f"{self.prefix}u:{{{self.key_id}}}:{'bt' if byok else 't'}"
        return int(await self.redis.get(name) or 0)

    async def uses(self) -> int:
        return int(await self.redis.hget(f"{self.prefix}k:{{{self.key_id}}}", "total_uses") or 0)


MeteredKey = Callable[..., Awaitable[tuple[Issued, "Usage"]]]


@pytest.fixture
def metered_key(make_key: MakeKey, redis: Redis, key_prefix: str) -> MeteredKey:
    """``issued, usage = await metered_key(**values)``: a key and its usage in Redis."""

    async def make(**values: object) -> tuple[Issued, Usage]:
        issued = await make_key(**values)
        return issued, Usage(redis, key_prefix, issued.record.id)

    return make


async def call(gateway: Gateway, http: aiohttp.ClientSession, path: str, secret: str) -> int:
    async with http.get(f"{gateway.url}{path}", headers=bearer(secret)) as r:
        await r.read()
        status = r.status
    await gateway.proxy.settlements.drain()
    return status


async def test_header_cost_replaces_the_reservation_and_is_hidden_from_the_client(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
) -> None:
    issued, usage = await metered_key()
    async with http.get(
        f"{cost_gateway.url}/c/header?cost=0.37", headers=bearer(issued.secret)
    ) as r:
        assert r.status == 200
        assert "X-Usage-Cost" not in r.headers
    await cost_gateway.proxy.settlements.drain()
    assert await usage.total() == 370_000
    assert await call(cost_gateway, http, "/c/header?cost=0.000001", issued.secret) == 200
    assert await usage.total() == 370_001
    assert await usage.uses() == 2


async def test_a_response_that_does_not_state_its_cost_is_charged_the_reservation(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
) -> None:
    issued, usage = await metered_key()
    assert await call(cost_gateway, http, "/c/header", issued.secret) == 200
    assert await usage.total() == 1_000_000  # reserve: 1.0
    assert await call(cost_gateway, http, "/c/header?cost=abc", issued.secret) == 200
    assert await call(cost_gateway, http, "/c/header?cost=-2", issued.secret) == 200
    assert await usage.total() == 3_000_000
    assert await call(cost_gateway, http, "/c/header0", issued.secret) == 200
    assert await usage.total() == 3_000_000  # that route reserves nothing


async def test_json_body_and_last_sse_event_costs_with_per_unit(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
) -> None:
    issued, usage = await metered_key()
    assert await call(cost_gateway, http, "/c/json?tokens=123", issued.secret) == 200
    assert await usage.total() == 123_000
    async with http.get(
        f"{cost_gateway.url}/c/sse?tokens=57&chunks=3&interval=0.2", headers=bearer(issued.secret)
    ) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await r.content.readline()  # arrives long before the stream ends
        assert first.startswith(b"data: ")
        rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    await cost_gateway.proxy.settlements.drain()
    assert await usage.total() == 180_000


async def test_upstream_failures_are_refunded(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
) -> None:
    issued, usage = await metered_key()
    assert await call(cost_gateway, http, "/c/header?cost=0.5&status=503", issued.secret) == 503
    assert await call(cost_gateway, http, "/c/dead_fixed", issued.secret) == 502
    assert await usage.total() == 0
    assert await usage.uses() == 2  # used, but not charged
    # A 4xx is the upstream's answer, not its failure: charged.
    assert await call(cost_gateway, http, "/c/header?cost=0.5&status=400", issued.secret) == 400
    assert await usage.total() == 500_000


async def test_charge_failed_routes_charge_even_a_failed_upstream(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
) -> None:
    issued, usage = await metered_key()
    assert await call(cost_gateway, http, "/c/charged?status=500", issued.secret) == 500
    assert await usage.total() == 500_000


async def test_a_client_gone_before_the_first_byte_is_refunded(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
) -> None:
    issued, usage = await metered_key(limit_micro=1_000_000)
    try:
        async with http.get(
            f"{cost_gateway.url}/c/header?cost=0.5&delay=1",
            headers=bearer(issued.secret),
            timeout=aiohttp.ClientTimeout(total=0.2),
        ) as r:
            await r.read()
    except TimeoutError:
        pass
    await asyncio.sleep(0.3)  # the gateway notices the disconnect and cancels
    await cost_gateway.proxy.settlements.drain()
    assert await usage.total() == 0
    # The reservation is back: the whole limit (1.0 = one header-route reserve) is usable.
    assert await call(cost_gateway, http, "/c/header?cost=1", issued.secret) == 200


async def test_byok_usage_is_counted_apart_and_against_the_limit_only_when_included(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    issued, usage = await metered_key(limit_micro=100_000, limit_reset="daily")
    for _ in range(2):  # BYOK spend is not limited by default
        assert await call(cost_gateway, http, "/c/byok?cost=0.4", issued.secret) == 200
    assert await usage.total(byok=True) == 800_000
    assert await usage.total() == 0
    await store.update(issued.record.id, {"include_byok_in_limit": True})
    # Including it counts today's BYOK spend, but never beyond the limit: at it, not over.
    assert await call(cost_gateway, http, "/c/byok?cost=0.4", issued.secret) == 402
    assert await call(cost_gateway, http, "/c/fixed", issued.secret) == 402
    _, report = await store.report(issued.record.id)
    assert report is not None
    assert report.to_json()["byok_usage_daily"] == 0.8
    assert report.to_json()["limit_remaining"] == 0.0


async def test_a_key_revoked_mid_request_is_not_recreated_by_its_settlement(
    cost_gateway: Gateway,
    make_key: MakeKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    issued = await make_key()
    request = asyncio.ensure_future(
        call(cost_gateway, http, "/c/header?cost=0.5&delay=0.3", issued.secret)
    )
    await asyncio.sleep(0.1)
    assert await store.revoke(issued.record.id)
    assert await request == 200
    rid = issued.record.id
    assert not await redis.exists(f"{key_prefix}k:{{{rid}}}", f"{key_prefix}u:{{{rid}}}:t")


async def test_a_settlement_survives_the_server_losing_its_scripts(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
    redis: Redis,
) -> None:
    issued, usage = await metered_key()
    assert await call(cost_gateway, http, "/c/header?cost=0.25", issued.secret) == 200
    await redis.script_flush()  # as after a restart without persistence of the script cache
    assert await call(cost_gateway, http, "/c/header?cost=0.5", issued.secret) == 200
    assert await usage.total() == 750_000
    assert cost_gateway.proxy.settlements.failed == 0


@pytest.mark.single_server
async def test_a_settlement_waits_for_a_connection_when_none_is_open(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
    redis: Redis,
) -> None:
    issued, usage = await metered_key()
    assert await call(cost_gateway, http, "/c/header?cost=0.25&delay=0.3", issued.secret) == 200
    request = asyncio.ensure_future(
        call(cost_gateway, http, "/c/header?cost=0.5&delay=0.3", issued.secret)
    )
    await asyncio.sleep(0.1)  # authorized, waiting for the upstream
    # The server drops the gateway's connection: none is open when the settlement is due.
    own_id = await cost_gateway.mux.execute("CLIENT", "ID")
    assert await redis.client_kill_filter(_id=own_id) == 1
    assert await request == 200
    assert await usage.total() == 750_000


async def abandon_while_paused(
    gateway: Gateway, http: aiohttp.ClientSession, redis: Redis, secret: str
) -> None:
    """A request whose client gives up while its authorize script waits: writes wait while
    the server is paused, so the script is sent, not yet run, when the handler is
    cancelled; it runs (and reserves) about 0.4 s later."""
    assert await call(gateway, http, "/c/header?cost=0", secret) == 200  # connected, warm
    await redis.execute_command("CLIENT", "PAUSE", "400", "WRITE")
    with contextlib.suppress(TimeoutError):
        async with http.get(
            f"{gateway.url}/c/header?cost=0.5",
            headers=bearer(secret),
            timeout=aiohttp.ClientTimeout(total=0.15),
        ) as r:
            await r.read()
    await asyncio.sleep(0.05)  # the handler has been cancelled


@pytest.mark.single_server
async def test_a_client_gone_while_its_authorization_runs_gets_its_reservation_back(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
    redis: Redis,
) -> None:
    issued, usage = await metered_key(limit_micro=1_000_000)
    await abandon_while_paused(cost_gateway, http, redis, issued.secret)
    await asyncio.sleep(0.6)  # the pause ends, the script runs, its late reply is handled
    await cost_gateway.proxy.settlements.drain()
    assert await usage.total() == 0
    assert await usage.uses() == 2  # admitted, then refunded: never forwarded
    assert await call(cost_gateway, http, "/c/header?cost=1", issued.secret) == 200


@pytest.mark.single_server
async def test_shutdown_waits_for_a_late_authorization_and_refunds_it(
    cost_gateway: Gateway,
    metered_key: MeteredKey,
    http: aiohttp.ClientSession,
    redis: Redis,
) -> None:
    issued, usage = await metered_key(limit_micro=1_000_000)
    await abandon_while_paused(cost_gateway, http, redis, issued.secret)
    assert await usage.uses() == 1  # the abandoned script has not run yet
    await cost_gateway.proxy.close()  # returns once the late reply's refund is written
    assert await usage.uses() == 2  # the abandoned authorization ran before close returned
    assert await usage.total() == 0  # and what it reserved came back
