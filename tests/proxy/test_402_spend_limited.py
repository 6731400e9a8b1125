"""402: spending caps. The reservation is taken in the authorize script, so a cap that
covers N requests admits exactly N; the body names the cap, Retry-After says when it
resets; caps set after spending never leave a key over budget."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
from redis.asyncio import Redis

from gateway.store.keystore import KeyStore
from gateway.store.record import RateLimitSpec, SpendCap
from gateway.usage.periods import FixedClock, to_ms
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, assert_openai_error, assert_problem

NOON = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)  # a Wednesday


async def usage(redis: Redis, prefix: str, key_id: str, bucket: str) -> int:
    return int(await redis.get(f"{prefix}u:{{{key_id}}}:{bucket}") or 0)


async def test_a_daily_limit_admits_exactly_what_it_covers_then_402_names_the_cap(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession,
    redis: Redis, key_prefix: str,
) -> None:
    clock = FixedClock(to_ms(NOON))
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key(limit_micro=1_000_000, limit_reset="daily")  # 4 x 0.25
    for _ in range(4):
        async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            assert r.status == 200
    async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        body = await assert_problem(r, 402, "spend_limited")
        # noon to midnight UTC: 12 hours
        assert r.headers["Retry-After"] == str(12 * 3600)
    assert body["cap"] == {
        "name": "limit",
        "amount": 1.0,
        "period": "daily",
        "used": 1.0,
        "reserved": 0.25,
        "resets_at": "2026-11-19T00:00:00.000Z",
    }
    assert body["detail"] == (
        "the key's daily limit of 1 is used up (1 used); "
        "it resets at 2026-11-19T00:00:00.000Z"
    )
    rid = issued.record.id
    assert await usage(redis, key_prefix, rid, "d:20261118") == 1_000_000
    assert await usage(redis, key_prefix, rid, "w:2026W47") == 1_000_000
    assert await usage(redis, key_prefix, rid, "m:202611") == 1_000_000
    assert await usage(redis, key_prefix, rid, "t") == 1_000_000
    assert await redis.hget(f"{key_prefix}k:{{{rid}}}", "total_uses") == "4"

    clock.set(datetime(2026, 11, 19, 0, 0, tzinfo=UTC))  # midnight: a new daily bucket
    async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        assert r.status == 200
    assert await usage(redis, key_prefix, rid, "d:20261119") == 250_000
    assert await usage(redis, key_prefix, rid, "t") == 1_250_000


async def test_a_reservation_that_does_not_fit_says_used_reserved_and_limit(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    """4.5 of 5 used, and the route reserves 1: the cap is not used up, the request does
    not fit. The answer says so instead of "the key has used its limit"."""
    gateway: Gateway = await start_cost_gateway(clock=FixedClock(to_ms(NOON)))  # type: ignore[operator]
    issued = await make_key(limit_micro=5_000_000, limit_reset="daily")
    # Reserves 1 (the route's reserve), then is charged the 4.5 the upstream reports.
    async with http.get(f"{gateway.url}/c/header?cost=4.5", headers=bearer(issued.secret)) as r:
        assert r.status == 200
    await gateway.proxy.settlements.drain()
    async with http.get(f"{gateway.url}/c/header?cost=0.1", headers=bearer(issued.secret)) as r:
        body = await assert_problem(r, 402, "spend_limited")
    assert body["detail"] == (
        "the key's daily limit is 5: 4.5 is used and this request reserves 1, "
        "which would pass it; it resets at 2026-11-19T00:00:00.000Z"
    )
    assert body["cap"] == {
        "name": "limit",
        "amount": 5.0,
        "period": "daily",
        "used": 4.5,
        "reserved": 1.0,
        "resets_at": "2026-11-19T00:00:00.000Z",
    }
    # A request that fits still passes: this route reserves nothing, and 4.5 + 0 <= 5.
    async with http.get(f"{gateway.url}/c/header0?cost=0.5", headers=bearer(issued.secret)) as r:
        assert r.status == 200


async def test_every_spend_cap_must_hold_and_the_one_that_resets_last_is_named(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gateway: Gateway = await start_cost_gateway(clock=FixedClock(to_ms(NOON)))  # type: ignore[operator]
    issued = await make_key(
        spend_caps=(SpendCap(10_000_000, "daily"), SpendCap(500_000, "monthly"))
    )
    for _ in range(2):
        async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            assert r.status == 200
    async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        body = await assert_problem(r, 402, "spend_limited")
        assert int(r.headers["Retry-After"]) == (
            to_ms(datetime(2026, 12, 1, tzinfo=UTC)) - to_ms(NOON)
        ) // 1000
    assert body["cap"]["name"] == "spend_caps[1]"
    assert body["cap"]["resets_at"] == "2026-12-01T00:00:00.000Z"


async def test_a_cap_over_all_time_has_no_retry_after(
    cost_gateway: Gateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    issued = await make_key(limit_micro=250_000)  # limit_reset null: all time
    async with http.get(f"{cost_gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        assert r.status == 200
    async with http.get(f"{cost_gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        body = await assert_problem(r, 402, "spend_limited")
        assert "Retry-After" not in r.headers
    assert body["cap"]["period"] == "total"
    assert body["cap"]["resets_at"] is None
    assert body["detail"] == "the key's limit over all time of 0.25 is used up (0.25 used)"


async def test_a_used_up_cap_refuses_even_requests_that_reserve_nothing_but_not_free_ones(
    cost_gateway: Gateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    issued = await make_key(limit_micro=300_000, limit_reset="monthly")
    url = f"{cost_gateway.url}/c/header0?cost=0.3"
    async with http.get(url, headers=bearer(issued.secret)) as r:
        assert r.status == 200
        assert "X-Usage-Cost" not in r.headers  # read by keygate, never shown
    await cost_gateway.proxy.settlements.drain()
    async with http.get(url, headers=bearer(issued.secret)) as r:
        await assert_problem(r, 402, "spend_limited")
    async with http.get(f"{cost_gateway.url}/c/free", headers=bearer(issued.secret)) as r:
        assert r.status == 200  # a route without a cost rule is outside every cap


async def test_openai_routes_get_402_in_openai_shape_with_the_cap(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gateway: Gateway = await start_cost_gateway()  # type: ignore[operator]
    issued = await make_key(limit_micro=0)
    async with http.get(f"{gateway.url}/c/json?tokens=1", headers=bearer(issued.secret)) as r:
        body = await assert_openai_error(r, 402, "spend_limited", "insufficient_quota")
    assert body["error"]["cap"]["amount"] == 0.0


async def test_denied_requests_reserve_nothing_and_use_no_rate(
    cost_gateway: Gateway, make_key: MakeKey, http: aiohttp.ClientSession,
    redis: Redis, key_prefix: str,
) -> None:
    issued = await make_key(
        limit_micro=250_000, rate_limit=RateLimitSpec(100, 60), scopes=["none"]
    )
    async with http.get(f"{cost_gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        assert r.status == 200
    for _ in range(3):
        async with http.get(f"{cost_gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            assert r.status == 402
            assert r.headers["RateLimit"] == '"key";r=99;t=1'
    rid = issued.record.id
    assert await usage(redis, key_prefix, rid, "t") == 250_000
    assert await redis.hget(f"{key_prefix}k:{{{rid}}}", "total_uses") == "1"


async def test_lowering_a_limit_below_spend_leaves_the_key_at_the_cap_not_over(
    start_cost_gateway: object, make_key: MakeKey, store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    clock = FixedClock(to_ms(NOON))
    store.clock = clock
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key()
    rid = issued.record.id
    for _ in range(4):  # 1.0 spent today, no limit yet
        async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            assert r.status == 200
    await store.update(rid, {"limit_micro": 500_000, "limit_reset": "daily"})
    _, report = await store.report(rid)
    assert report is not None and report.limit_remaining_micro == 0
    assert report.caps[0].counted_micro == 500_000  # at the cap, not over it
    async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        assert r.status == 402
    # Raising it counts today's spend in full: 1.0 of 1.5 used, two more requests.
    await store.update(rid, {"limit_micro": 1_500_000})
    codes = []
    for _ in range(3):
        async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            codes.append(r.status)
    assert codes == [200, 200, 402]
    # Tomorrow the daily limit counts the whole day again.
    clock.set(datetime(2026, 11, 19, tzinfo=UTC))
    _, report = await store.report(rid)
    assert report is not None and report.limit_remaining_micro == 1_500_000


async def test_adding_a_reset_period_does_not_count_spend_of_earlier_periods(
    start_cost_gateway: object, make_key: MakeKey, store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    clock = FixedClock(to_ms(datetime(2026, 10, 31, 12, tzinfo=UTC)))
    store.clock = clock
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key(limit_micro=2_000_000)  # all time
    for _ in range(6):  # 1.5 in October
        async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            assert r.status == 200
    clock.set(NOON)
    await store.update(issued.record.id, {"limit_reset": "monthly"})
    _, report = await store.report(issued.record.id)
    assert report is not None and report.limit_remaining_micro == 2_000_000
