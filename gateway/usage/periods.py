"""UTC periods and the names of their usage buckets (docs/architecture.md).

The Lua scripts compute the same names from the Redis server's clock
(``gateway/store/lua/lib.lua``); ``tests/usage/test_periods.py`` checks that both agree.
Days are UTC days, weeks are ISO weeks (Monday 00:00 UTC, numbered in the year of their
Thursday), months are calendar months.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

Period = Literal["daily", "weekly", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly")
DAY_MS = 86_400_000


@dataclass(slots=True)
class FixedClock:
    """A test's clock: every script sees ``now_ms`` instead of the server's TIME (a
    gateway/store/clock.py:ClockOverride)."""

    now_ms: int

    def __call__(self) -> str:
        return str(self.now_ms)

    def set(self, moment: datetime) -> None:
        self.now_ms = to_ms(moment)

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@dataclass(frozen=True, slots=True)
class Bucket:
    period: Period
    name: str  # the bucket key's suffix: d:20261122, w:2026W47, m:202611
    start_ms: int
    end_ms: int  # exclusive: the instant the period resets

    @property
    def label(self) -> str:
        """What a chart shows: 2026-11-22, 2026-W47, 2026-11."""
        if self.period == "daily":
            return f"{self.name[2:6]}-{self.name[6:8]}-{self.name[8:10]}"
        if self.period == "weekly":
            return f"{self.name[2:6]}-{self.name[6:]}"
        return f"{self.name[2:6]}-{self.name[6:8]}"


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _ms(day: date) -> int:
    return (day - date(1970, 1, 1)).days * DAY_MS


def bucket(period: Period, now_ms: int) -> Bucket:
    """The bucket of ``period`` that contains the instant ``now_ms``."""
    day = datetime.fromtimestamp(now_ms // DAY_MS * 86_400, tz=UTC).date()
    if period == "daily":
        return Bucket(period, f"d:{day:%Y%m%d}", _ms(day), _ms(day) + DAY_MS)
    if period == "weekly":
        monday = day - timedelta(days=day.weekday())
        iso_year, week, _ = day.isocalendar()
        return Bucket(period, f"w:{iso_year:04d}W{week:02d}", _ms(monday), _ms(monday) + 7 * DAY_MS)
    first = day.replace(day=1)
    following = (
        first.replace(year=first.year + 1, month=1)
        if first.month == 12
        else (first.replace(month=first.month + 1))
    )
    return Bucket(period, f"m:{first:%Y%m}", _ms(first), _ms(following))


def history(period: Period, now_ms: int, count: int) -> list[Bucket]:
    """The ``count`` buckets of ``period`` up to and including the current one, oldest
    first."""
    found = [bucket(period, now_ms)]
    while len(found) < count:
        found.append(bucket(period, found[-1].start_ms - 1))
    found.reverse()
    return found


DayHint = tuple[int, str, str, str, int, int, int]


@functools.lru_cache(maxsize=64)
def day_hint(day: int) -> DayHint:
    """The buckets of UTC day number ``day`` as the Lua scripts take them (buckets_at in
    lib.lua): day start, daily, weekly and monthly names, then their three ends (ms)."""
    now_ms = day * DAY_MS
    daily, weekly, monthly = (bucket(p, now_ms) for p in PERIODS)
    return (
        daily.start_ms,
        daily.name,
        weekly.name,
        monthly.name,
        daily.end_ms,
        weekly.end_ms,
        monthly.end_ms,
    )
