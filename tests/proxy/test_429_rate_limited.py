"""429: rate limits (GCRA in the authorize script). A key's own limit wins over the
route's default; every response to a rate-limited key carries the IETF draft's
RateLimit-Policy and RateLimit fields, and a 429 carries Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp

from gateway.store.record import RateLimitSpec
from gateway.usage.periods import FixedClock, to_ms
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, assert_problem

START = to_ms(datetime(2026, 11, 22, 12, tzinfo=UTC))


async def test_a_burst_is_admitted_then_429_with_retry_after_until_the_next_slot(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    clock = FixedClock(START)
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key(rate_limit=RateLimitSpec(3, 30))  # burst 3, then one per 10 s
    seen = []
    for _ in range(3):
        async with http.get(f"{gateway.url}/c/free", headers=bearer(issued.secret)) as r:
            assert r.status == 200
            assert r.headers["RateLimit-Policy"] == '"key";q=3;w=30'
            seen.append(r.headers["RateLimit"])
    assert seen == ['"key";r=2;t=10', '"key";r=1;t=20', '"key";r=0;t=30']
    async with http.get(f"{gateway.url}/c/free", headers=bearer(issued.secret)) as r:
        body = await assert_problem(r, 429, "rate_limited")
        assert r.headers["Retry-After"] == "10"
        assert r.headers["RateLimit-Policy"] == '"key";q=3;w=30'
        assert r.headers["RateLimit"] == '"key";r=0;t=30'
    assert body["detail"] == 'this key\'s rate limit ("key";q=3;w=30) is reached; retry in 10 s'

    clock.advance(9_999)  # one millisecond short of the next slot
    async with http.get(f"{gateway.url}/c/free", headers=bearer(issued.secret)) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "1"
    clock.advance(1)
    async with http.get(f"{gateway.url}/c/free", headers=bearer(issued.secret)) as r:
        assert r.status == 200
        assert r.headers["RateLimit"] == '"key";r=0;t=30'
    clock.advance(60_000)  # idle for longer than the window: the whole burst is back
    async with http.get(f"{gateway.url}/c/free", headers=bearer(issued.secret)) as r:
        assert r.headers["RateLimit"] == '"key";r=2;t=10'


async def test_the_routes_default_applies_to_keys_without_their_own(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gateway: Gateway = await start_cost_gateway(clock=FixedClock(START))  # type: ignore[operator]
    plain = await make_key()
    own = await make_key(rate_limit=RateLimitSpec(5, 60))
    codes = []
    for _ in range(3):
        async with http.get(f"{gateway.url}/c/limited", headers=bearer(plain.secret)) as r:
            codes.append(r.status)
            assert r.headers["RateLimit-Policy"] == '"route";q=2;w=60'
    assert codes == [200, 200, 429]
    for _ in range(5):  # the key's own limit wins over the route's default
        async with http.get(f"{gateway.url}/c/limited", headers=bearer(own.secret)) as r:
            assert r.status == 200
            assert r.headers["RateLimit-Policy"] == '"key";q=5;w=60'
    # The route's default is per route: the same key is not limited elsewhere.
    async with http.get(f"{gateway.url}/c/free", headers=bearer(plain.secret)) as r:
        assert r.status == 200
        assert "RateLimit" not in r.headers


async def test_keys_are_limited_independently(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gateway: Gateway = await start_cost_gateway(clock=FixedClock(START))  # type: ignore[operator]
    first = await make_key(rate_limit=RateLimitSpec(1, 60))
    second = await make_key(rate_limit=RateLimitSpec(1, 60))
    async with http.get(f"{gateway.url}/c/free", headers=bearer(first.secret)) as r:
        assert r.status == 200
    async with http.get(f"{gateway.url}/c/free", headers=bearer(first.secret)) as r:
        assert r.status == 429
    async with http.get(f"{gateway.url}/c/free", headers=bearer(second.secret)) as r:
        assert r.status == 200


async def test_upstream_errors_still_carry_the_rate_headers(
    cost_gateway: Gateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    issued = await make_key(rate_limit=RateLimitSpec(10, 60))
    async with http.get(f"{cost_gateway.url}/c/dead_fixed", headers=bearer(issued.secret)) as r:
        await assert_problem(r, 502, "upstream_error")
        assert r.headers["RateLimit-Policy"] == '"key";q=10;w=60'
        assert r.headers["RateLimit"].startswith('"key";r=9;')


async def test_sub_second_periods_round_the_interval_up_never_admitting_extra(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    clock = FixedClock(START)
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key(rate_limit=RateLimitSpec(3, 0.001))  # 333.33 us -> 334 us
    admitted = 0
    for _ in range(2):
        for _ in range(4):
            async with http.get(f"{gateway.url}/c/free", headers=bearer(issued.secret)) as r:
                admitted += r.status == 200
        clock.advance(1)
    # 3 per ms would be 6; the 334 us interval refills only 2 of the 3 after 1 ms.
    assert admitted == 5


async def test_refusals_of_a_rate_limited_key_carry_the_headers_and_use_no_quota(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gateway: Gateway = await start_cost_gateway(clock=FixedClock(START))  # type: ignore[operator]
    issued = await make_key(rate_limit=RateLimitSpec(2, 60), limit_micro=0)
    async with http.get(f"{gateway.url}/hello", headers=bearer(issued.secret)) as r:
        assert r.status == 200  # a free route: the zero limit does not matter
    async with http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret)) as r:
        await assert_problem(r, 403, "forbidden_scope")
        assert r.headers["RateLimit"] == '"key";r=1;t=30'
    async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
        await assert_problem(r, 402, "spend_limited")
        assert r.headers["RateLimit"] == '"key";r=1;t=30'
    async with http.get(f"{gateway.url}/hello", headers=bearer(issued.secret)) as r:
        assert r.status == 200
        assert r.headers["RateLimit"] == '"key";r=0;t=60'
