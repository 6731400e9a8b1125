"""A key's usage per period over a chart's window (GET /v1/keys/{id}/usage).

The buckets are the ones the Lua scripts write (``lib.lua``'s ``add_usage``): their names
come from ``periods.bucket``, and every bucket of the window outlives it in Redis (daily 92
days, weekly 189 days, monthly 762 days), so a missing bucket means no usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.store.connection import StoreClient
from gateway.store.names import KeyNames
from gateway.store.record import from_micro, rfc3339
from gateway.usage.periods import PERIODS, Bucket, Period, history

# How many buckets of each period a chart shows, the current one last.
WINDOW: dict[Period, int] = {"daily": 90, "weekly": 26, "monthly": 24}
BYOK = "b"  # BYOK buckets are the same names with this in front (bd:..., bw:..., bm:...)


@dataclass(frozen=True, slots=True)
class Point:
    bucket: Bucket
    usage_micro: int
    byok_micro: int

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.bucket.label,
            "start": rfc3339(self.bucket.start_ms),
            "end": rfc3339(self.bucket.end_ms),
            "usage": from_micro(self.usage_micro),
            "byok_usage": from_micro(self.byok_micro),
        }


@dataclass(frozen=True, slots=True)
class UsageHistory:
    key_id: str
    now_ms: int
    points: dict[Period, list[Point]]  # oldest first, the current bucket last

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key_id": self.key_id, "now": rfc3339(self.now_ms)}
        for period in PERIODS:
            body[period] = [point.to_json() for point in self.points[period]]
        return body


def window(now_ms: int) -> list[Bucket]:
    """Every bucket a chart at ``now_ms`` shows: the daily ones, then weekly, then monthly,
    each oldest first."""
    return [b for period in PERIODS for b in history(period, now_ms, WINDOW[period])]


async def read(client: StoreClient, names: KeyNames, key_id: str, now_ms: int) -> UsageHistory:
    """The key's usage and BYOK usage in every bucket of the window, in one MGET (all of
    one key's buckets share its hash tag, so this is one Cluster slot). Writes nothing."""
    buckets = window(now_ms)
    keys = [names.usage(key_id, b.name) for b in buckets]
    keys += [names.usage(key_id, BYOK + b.name) for b in buckets]
    values: list[str | bytes | None] = await client.mget(keys)
    usage, byok = values[: len(buckets)], values[len(buckets) :]
    points: dict[Period, list[Point]] = {period: [] for period in PERIODS}
    for b, spent, spent_byok in zip(buckets, usage, byok, strict=True):
        points[b.period].append(Point(b, _micro(spent), _micro(spent_byok)))
    return UsageHistory(key_id, now_ms, points)


def _micro(value: str | bytes | None) -> int:
    return 0 if value is None else int(value)
