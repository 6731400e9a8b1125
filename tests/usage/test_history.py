"""gateway/usage/history.py: the chart window, and reading it from Redis in one MGET."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise

from redis.asyncio import Redis

from gateway.store.names import KeyNames
from gateway.usage import history
from gateway.usage.periods import bucket, to_ms

NOW = to_ms(datetime(2026, 11, 22, 14, 3, 7, 512000, tzinfo=UTC))
KEY_ID = "6f1c1c0e-2f7a-4a51-9d0e-3b2f7d1b8a11"


def test_window_is_90_days_26_weeks_24_months_each_ending_now() -> None:
    found = history.window(NOW)
    assert [b.period for b in found] == ["daily"] * 90 + ["weekly"] * 26 + ["monthly"] * 24
    days, weeks, months = found[:90], found[90:116], found[116:]
    assert [days[0].label, days[-1].label] == ["2026-08-25", "2026-11-22"]
    assert [weeks[0].label, weeks[-1].label] == ["2026-W22", "2026-W47"]
    assert [months[0].label, months[-1].label] == ["2024-12", "2026-11"]
    for series in (days, weeks, months):
        assert series[-1] == bucket(series[-1].period, NOW)
        assert all(a.end_ms == b.start_ms for a, b in pairwise(series))


async def test_read_puts_each_bucket_on_its_period(redis: Redis, key_prefix: str) -> None:
    names = KeyNames(key_prefix)
    await redis.mset(
        {
            names.usage(KEY_ID, "d:20261122"): 1_500_000,
            names.usage(KEY_ID, "bd:20261122"): 250_000,
            names.usage(KEY_ID, "w:2026W22"): 3,  # the oldest week shown: 3 micro-units
            names.usage(KEY_ID, "m:202411"): 7_000_000,  # a month before the window
            names.usage(KEY_ID, "t"): 99_000_000,  # the total is not a period
        }
    )
    found = await history.read(redis, names, KEY_ID, NOW)
    assert found.key_id == KEY_ID and found.now_ms == NOW
    assert [len(found.points[p]) for p in ("daily", "weekly", "monthly")] == [90, 26, 24]
    today = found.points["daily"][-1]
    assert (today.bucket.name, today.usage_micro, today.byok_micro) == (
        "d:20261122",
        1_500_000,
        250_000,
    )
    assert found.points["weekly"][0].usage_micro == 3
    spent = {
        (p.bucket.name, p.usage_micro, p.byok_micro)
        for series in found.points.values()
        for p in series
        if p.usage_micro or p.byok_micro
    }
    assert spent == {("d:20261122", 1_500_000, 250_000), ("w:2026W22", 3, 0)}
    body = found.to_json()
    assert body["now"] == "2026-11-22T14:03:07.512Z"
    assert body["daily"][-1] == {
        "period": "2026-11-22",
        "start": "2026-11-22T00:00:00.000Z",
        "end": "2026-11-23T00:00:00.000Z",
        "usage": 1.5,
        "byok_usage": 0.25,
    }
    assert body["weekly"][0]["usage"] == 0.000003
