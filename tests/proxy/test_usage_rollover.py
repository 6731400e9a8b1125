"""Period rollover without waiting: the scripts take a test's clock instead of the Redis
server's TIME. Days roll at UTC midnight, weeks on Monday 00:00 UTC (ISO weeks, numbered
in their Thursday's year), months on the 1st; leap days are days like any other."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
from redis.asyncio import Redis

from gateway.store.record import SpendCap
from gateway.usage.periods import FixedClock, to_ms
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway

MS = timedelta(milliseconds=1)


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


async def buckets(redis: Redis, prefix: str, key_id: str) -> dict[str, int]:
    base = f"{prefix}u:{{{key_id}}}:"
    names = [k async for k in redis.scan_iter(match=f"{base}*")]
    values = await redis.mget(names) if names else []
    return {name[len(base) :]: int(v) for name, v in zip(names, values, strict=True)}


async def get(gateway: Gateway, http: aiohttp.ClientSession, path: str, secret: str) -> int:
    async with http.get(f"{gateway.url}{path}", headers=bearer(secret)) as r:
        await r.read()
        return r.status


async def test_leap_february_rolls_day_by_day_and_month_on_the_first(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession,
    redis: Redis, key_prefix: str,
) -> None:
    clock = FixedClock(to_ms(at(2028, 2, 28) + timedelta(days=1) - MS))  # Mon 28 Feb 23:59:59.999
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key(limit_micro=250_000, limit_reset="daily")  # one request a day
    secret, rid = issued.secret, issued.record.id
    assert await get(gateway, http, "/c/fixed", secret) == 200
    async with http.get(f"{gateway.url}/c/fixed", headers=bearer(secret)) as r:
        assert r.status == 402
        assert r.headers["Retry-After"] == "1"  # 1 ms to midnight, rounded up
    clock.advance(1)  # 29 Feb 00:00:00.000
    assert await get(gateway, http, "/c/fixed", secret) == 200
    assert await get(gateway, http, "/c/fixed", secret) == 402
    clock.set(at(2028, 3, 1) - MS)  # 29 Feb 23:59:59.999: still the leap day
    assert await get(gateway, http, "/c/fixed", secret) == 402
    clock.advance(1)  # 1 March
    assert await get(gateway, http, "/c/fixed", secret) == 200
    assert await buckets(redis, key_prefix, rid) == {
        "d:20280228": 250_000,
        "d:20280229": 250_000,
        "d:20280301": 250_000,
        "w:2028W09": 750_000,  # Monday 28 Feb .. Sunday 5 Mar
        "m:202802": 500_000,
        "m:202803": 250_000,
        "t": 750_000,
    }


async def test_weeks_roll_on_monday_and_belong_to_their_thursdays_year(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession,
    redis: Redis, key_prefix: str,
) -> None:
    clock = FixedClock(to_ms(at(2026, 12, 27, 23, 59, 59)))  # Sunday of 2026-W52
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key(spend_caps=(SpendCap(500_000, "weekly"),))
    secret, rid = issued.secret, issued.record.id
    statuses = [await get(gateway, http, "/c/fixed", secret) for _ in range(3)]
    assert statuses == [200, 200, 402]
    clock.set(at(2026, 12, 28))  # Monday: 2026-W53 (2026 has 53 ISO weeks)
    assert await get(gateway, http, "/c/fixed", secret) == 200
    clock.set(at(2027, 1, 1, 12))  # a Friday in January, still 2026-W53
    assert await get(gateway, http, "/c/fixed", secret) == 200
    assert await get(gateway, http, "/c/fixed", secret) == 402
    clock.set(at(2027, 1, 4))  # Monday: 2027-W01
    assert await get(gateway, http, "/c/fixed", secret) == 200
    found = await buckets(redis, key_prefix, rid)
    assert {k: v for k, v in found.items() if k.startswith("w:")} == {
        "w:2026W52": 500_000,
        "w:2026W53": 500_000,
        "w:2027W01": 250_000,
    }
    assert found["m:202612"] == 750_000 and found["m:202701"] == 500_000


async def test_a_request_that_straddles_midnight_is_charged_to_the_day_it_began(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession,
    redis: Redis, key_prefix: str,
) -> None:
    clock = FixedClock(to_ms(at(2026, 11, 30, 23, 59, 59, 900_000)))
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key()
    request = asyncio.ensure_future(
        get(gateway, http, "/c/header?cost=0.3&delay=0.3", issued.secret)
    )
    await asyncio.sleep(0.1)
    clock.set(at(2026, 12, 1))  # the response arrives in the next day, week... month
    assert await request == 200
    await gateway.proxy.settlements.drain()
    found = await buckets(redis, key_prefix, issued.record.id)
    assert found == {"d:20261130": 300_000, "w:2026W49": 300_000, "m:202611": 300_000,
                     "t": 300_000}


async def test_buckets_expire_after_their_period_plus_the_history_kept(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession,
    redis: Redis, key_prefix: str,
) -> None:
    clock = FixedClock(to_ms(at(2026, 11, 22, 12)))
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key()
    assert await get(gateway, http, "/c/fixed", issued.secret) == 200
    base = f"{key_prefix}u:{{{issued.record.id}}}:"
    day = 86_400_000
    assert await redis.pexpiretime(base + "d:20261122") == to_ms(at(2026, 11, 23)) + 92 * day
    assert await redis.pexpiretime(base + "w:2026W47") == to_ms(at(2026, 11, 23)) + 189 * day
    assert await redis.pexpiretime(base + "m:202611") == to_ms(at(2026, 12, 1)) + 762 * day
    assert await redis.pexpiretime(base + "t") == -1  # the total lives as long as the key
