"""A key's usage per period over a chart's window (GET /v1/keys/{id}/usage), in total and
per model.

The buckets are the ones the Lua scripts write (``lib.lua``'s ``add_usage`` and
``add_model_usage``): their names come from ``periods.bucket``, and every bucket of the
window outlives it in Redis (daily 92 days, weekly 189 days, monthly 762 days), so a
missing bucket means no usage. A bucket keeps at most ``MODELS_PER_BUCKET`` named models;
the rest are counted under ``other``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from gateway.store.connection import StoreClient
from gateway.store.names import KeyNames
from gateway.store.record import from_micro, rfc3339
from gateway.store.report import ModelsUsage, models_from_hash, models_json
from gateway.usage.periods import PERIODS, Bucket, Period, history

# How many buckets of each period a chart shows, the current one last.
WINDOW: dict[Period, int] = {"daily": 90, "weekly": 26, "monthly": 24}
BYOK = "b"  # BYOK buckets are the same names with this in front (bd:..., bw:..., bm:...)


@dataclass(frozen=True, slots=True)
class Point:
    bucket: Bucket
    usage_micro: int
    byok_micro: int
    models: ModelsUsage  # the bucket's usage per model, highest cost first

    def to_json(self) -> dict[str, Any]:
        """The point as a chart reads it; ``models`` only when the period has any (most
        of a chart's periods have none, and many keys never call a model)."""
        body: dict[str, Any] = {
            "period": self.bucket.label,
            "start": rfc3339(self.bucket.start_ms),
            "end": rfc3339(self.bucket.end_ms),
            "usage": from_micro(self.usage_micro),
            "byok_usage": from_micro(self.byok_micro),
        }
        if self.models:
            body["models"] = models_json(self.models)
        return body


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
    """The key's usage, BYOK usage and usage per model in every bucket of the window: one
    MGET (all of one key's buckets share its hash tag, so this is one Cluster slot) and,
    at the same time, a pipeline of an HGETALL per bucket (redis-py's Cluster pipelines
    refuse MGET). Writes nothing."""
    buckets = window(now_ms)
    keys = [names.usage(key_id, b.name) for b in buckets]
    keys += [names.usage(key_id, BYOK + b.name) for b in buckets]

    async def per_model() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for b in buckets:
                pipe.hgetall(names.model_usage(key_id, b.name))
            found: list[Any] = await pipe.execute()
        return found

    values, by_model = await asyncio.gather(client.mget(keys), per_model())
    usage, byok = values[: len(buckets)], values[len(buckets) :]
    points: dict[Period, list[Point]] = {period: [] for period in PERIODS}
    for b, spent, spent_byok, models in zip(buckets, usage, byok, by_model, strict=True):
        points[b.period].append(
            Point(b, _micro(spent), _micro(spent_byok), models_from_hash(models))
        )
    return UsageHistory(key_id, now_ms, points)


def _micro(value: str | bytes | None) -> int:
    return 0 if value is None else int(value)
