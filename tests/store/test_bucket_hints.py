"""The scripts take the caller's bucket names as a hint, trusted only for the UTC day it
names: a caller whose clock is off by a day boundary cannot misplace usage."""

from __future__ import annotations

from datetime import UTC, datetime

from redis.asyncio import Redis

from gateway.store.scripts import script_source
from gateway.usage.periods import DAY_MS, day_hint, to_ms

PROBE = script_source("settle").split("-- Settle one request")[0] + """
local b = buckets_at(tonumber(ARGV[1]), ARGV, 2)
return {b.daily, b.weekly, b.monthly, b.daily_end, b.weekly_end, b.monthly_end}
"""
NOON = to_ms(datetime(2026, 11, 22, 12, tzinfo=UTC))


async def probe(redis: Redis, ms: int, hint: tuple[object, ...]) -> list[object]:
    return list(await redis.eval(PROBE, 0, ms, *hint))


async def test_a_hint_for_the_instants_day_is_used_as_given(redis: Redis) -> None:
    start, *_, day_end, week_end, month_end = day_hint(NOON // DAY_MS)
    fake = (start, "d:fake", "w:fake", "m:fake", day_end, week_end, month_end)
    assert await probe(redis, NOON, fake) == ["d:fake", "w:fake", "m:fake", *fake[4:]]


async def test_a_hint_for_another_day_or_none_is_ignored(redis: Redis) -> None:
    computed = ["d:20261122", "w:2026W47", "m:202611", *day_hint(NOON // DAY_MS)[4:]]
    for hint in (
        day_hint(NOON // DAY_MS - 1),  # the caller's clock is a day behind
        day_hint(NOON // DAY_MS + 1),  # or ahead
        (NOON - DAY_MS, "d:x", "w:x", "m:x", NOON, NOON, NOON),  # ends exactly at the instant
        (),
    ):
        assert await probe(redis, NOON, hint) == computed
