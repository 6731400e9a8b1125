"""Python's period arithmetic (gateway/usage/periods.py) against the Lua one (lib.lua).

The scripts name the buckets they write from the Redis server's clock; the usage history
reads them by names computed in Python. Both must agree on every instant, across ISO
week-year edges (2026 has 53 ISO weeks), leap days and century years.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from itertools import pairwise

import pytest
from redis.asyncio import Redis

from gateway.usage.periods import DAY_MS, PERIODS, Bucket, Period, bucket, history, to_ms

HOUR_MS = 3_600_000
SEED = 20261122
# One EVAL checks many instants: buckets(ms) for each ARGV, flattened in this order.
_SNIPPET = """
local out = {}
for _, arg in ipairs(ARGV) do
  local b = buckets(tonumber(arg))
  for _, v in ipairs({b.daily, b.weekly, b.monthly, b.daily_end, b.weekly_end,
      b.monthly_end}) do
    out[#out + 1] = v
  end
end
return out
"""
_FIELDS = 6
_BATCH = 500


def _lib() -> str:
    return resources.files("gateway.store").joinpath("lua", "lib.lua").read_text("utf-8")


def _hours(first: date, last: date) -> list[int]:
    start = to_ms(datetime(first.year, first.month, first.day, tzinfo=UTC))
    end = to_ms(datetime(last.year, last.month, last.day, tzinfo=UTC)) + DAY_MS
    return list(range(start, end, HOUR_MS))


def _instants() -> list[int]:
    moments = [
        *_hours(date(2024, 12, 25), date(2025, 1, 10)),
        *_hours(date(2026, 12, 25), date(2027, 1, 10)),
        *_hours(date(2028, 2, 27), date(2028, 3, 2)),
        *_hours(date(2100, 2, 28), date(2100, 3, 1)),
        0,  # 1970-01-01T00:00Z, a Thursday in ISO week 1970-W01
        DAY_MS - 1,
    ]
    rng = random.Random(SEED)
    latest = to_ms(datetime(2200, 1, 1, tzinfo=UTC))
    moments += [rng.randrange(0, latest) for _ in range(2000)]
    # Both sides of every bucket edge among them: the last ms of a period and the first.
    edges = {bucket(p, ms).end_ms for ms in moments[:200] for p in PERIODS}
    moments += [ms for edge in sorted(edges) for ms in (edge - 1, edge)]
    return moments


def _python(ms: int) -> list[str | int]:
    found = [bucket(p, ms) for p in PERIODS]
    return [*(b.name for b in found), *(b.end_ms for b in found)]


async def test_python_and_lua_name_the_same_buckets(redis: Redis) -> None:
    source = _lib() + "\n" + _SNIPPET
    moments = _instants()
    assert len(moments) > 2000 + 24 * 17 * 2
    for i in range(0, len(moments), _BATCH):
        batch = moments[i : i + _BATCH]
        reply = await redis.eval(source, 0, *batch)
        lua = [v.decode() if isinstance(v, bytes) else v for v in reply]
        for j, ms in enumerate(batch):
            got = lua[j * _FIELDS : (j + 1) * _FIELDS]
            assert got == _python(ms), datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


@pytest.mark.parametrize(
    ("moment", "daily", "weekly", "monthly"),
    [
        (datetime(2026, 11, 22, 23, 59, tzinfo=UTC), "d:20261122", "w:2026W47", "m:202611"),
        (datetime(2026, 12, 31, tzinfo=UTC), "d:20261231", "w:2026W53", "m:202612"),
        (datetime(2027, 1, 3, 23, tzinfo=UTC), "d:20270103", "w:2026W53", "m:202701"),
        (datetime(2027, 1, 4, tzinfo=UTC), "d:20270104", "w:2027W01", "m:202701"),
        (datetime(2024, 12, 30, tzinfo=UTC), "d:20241230", "w:2025W01", "m:202412"),
        (datetime(2028, 2, 29, 12, tzinfo=UTC), "d:20280229", "w:2028W09", "m:202802"),
        (datetime(2100, 3, 1, tzinfo=UTC), "d:21000301", "w:2100W09", "m:210003"),
        (datetime(1970, 1, 1, tzinfo=UTC), "d:19700101", "w:1970W01", "m:197001"),
    ],
)
def test_bucket_names_of_known_instants(
    moment: datetime, daily: str, weekly: str, monthly: str
) -> None:
    ms = to_ms(moment)
    assert [bucket(p, ms).name for p in PERIODS] == [daily, weekly, monthly]


def test_a_bucket_starts_and_ends_where_its_period_does() -> None:
    ms = to_ms(datetime(2028, 2, 29, 13, 30, tzinfo=UTC))
    day, week, month = (bucket(p, ms) for p in PERIODS)
    assert (day.start_ms, day.end_ms) == (
        to_ms(datetime(2028, 2, 29, tzinfo=UTC)),
        to_ms(datetime(2028, 3, 1, tzinfo=UTC)),
    )
    assert (week.start_ms, week.end_ms) == (
        to_ms(datetime(2028, 2, 28, tzinfo=UTC)),  # Monday
        to_ms(datetime(2028, 3, 6, tzinfo=UTC)),
    )
    assert (month.start_ms, month.end_ms) == (
        to_ms(datetime(2028, 2, 1, tzinfo=UTC)),
        to_ms(datetime(2028, 3, 1, tzinfo=UTC)),
    )
    for b in (day, week, month):
        assert bucket(b.period, b.start_ms) == b == bucket(b.period, b.end_ms - 1)
        assert bucket(b.period, b.end_ms).start_ms == b.end_ms


def _check_series(found: list[Bucket], period: Period, count: int, now_ms: int) -> None:
    assert len(found) == count
    assert found[-1] == bucket(period, now_ms)  # the current period last
    assert len({b.name for b in found}) == count
    for earlier, later in pairwise(found):
        assert earlier.end_ms == later.start_ms  # contiguous: no gap, no overlap
        assert earlier.name < later.name
    for b in found:
        assert b.period == period and b.start_ms < b.end_ms
        assert bucket(period, b.start_ms) == b


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 22, 14, 3, tzinfo=UTC),
        datetime(2027, 1, 2, tzinfo=UTC),  # inside 2026-W53
        datetime(2028, 3, 1, 0, 0, tzinfo=UTC),
        datetime(2025, 1, 1, 23, 59, 59, tzinfo=UTC),
    ],
)
def test_history_is_contiguous_and_ends_now(moment: datetime) -> None:
    now = to_ms(moment)
    windows: list[tuple[Period, int]] = [("daily", 90), ("weekly", 26), ("monthly", 24)]
    for period, count in windows:
        _check_series(history(period, now, count), period, count, now)


def test_history_labels() -> None:
    now = to_ms(datetime(2027, 1, 2, 9, tzinfo=UTC))
    days = history("daily", now, 90)
    assert days[-1].label == "2027-01-02"
    assert days[0].label == (date(2027, 1, 2) - timedelta(days=89)).isoformat() == "2026-10-05"
    for b in days:
        start = datetime.fromtimestamp(b.start_ms / 1000, tz=UTC).date()
        assert b.label == start.isoformat() and b.end_ms - b.start_ms == DAY_MS

    weeks = history("weekly", now, 26)
    assert [b.label for b in weeks[-3:]] == ["2026-W51", "2026-W52", "2026-W53"]
    assert weeks[0].label == "2026-W28"
    for b in weeks:
        monday = datetime.fromtimestamp(b.start_ms / 1000, tz=UTC).date()
        iso_year, week, weekday = monday.isocalendar()
        assert weekday == 1 and b.label == f"{iso_year}-W{week:02d}"
        assert b.end_ms - b.start_ms == 7 * DAY_MS

    months = history("monthly", now, 24)
    assert months[-1].label == "2027-01" and months[0].label == "2025-02"
    assert "2026-02" in {b.label for b in months}
    for b in months:
        first = datetime.fromtimestamp(b.start_ms / 1000, tz=UTC).date()
        assert first.day == 1 and b.label == f"{first:%Y-%m}"
