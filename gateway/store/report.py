"""A key's usage now, as report.lua reads it in one call: per-period spend and usage per
model, each spending cap's counted spend and reset, and the rate-limit state; and its
public JSON form."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gateway.store.record import KeyRecord, decode, from_micro, pairs_to_dict, rfc3339

_ORDER = ("daily", "weekly", "monthly", "total")
MODEL_PERIODS = ("daily", "weekly", "monthly")
# Named models a usage bucket keeps at most (lib.lua's MODELS_PER_BUCKET); the requests of
# any further model are counted under OTHER_MODEL.
MODELS_PER_BUCKET = 32
OTHER_MODEL = "other"


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """One model's usage in one bucket: what its requests cost (their actual cost, BYOK
    included), their tokens, and how many they were."""

    cost_micro: int
    input_tokens: int
    output_tokens: int
    requests: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cost": from_micro(self.cost_micro),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "requests": self.requests,
        }


ModelsUsage = dict[str, ModelUsage]  # model -> its usage in one bucket


def models_from_hash(flat: list[Any] | dict[Any, Any]) -> ModelsUsage:
    """A per-model usage bucket as Redis holds it (lib.lua's add_model_usage: model ->
    'cost input output requests'), from HGETALL's flat reply or a client's dict; a field
    that does not parse is left out. Sorted by cost, highest first, then by name."""
    if isinstance(flat, dict):
        items = list(flat.items())
    else:  # model, value, model, value, ...
        items = list(zip(flat[::2], flat[1::2], strict=True))
    found: ModelsUsage = {}
    for model, value in items:
        numbers = _text(value).split(" ")
        if len(numbers) == 4 and all(n.lstrip("-").isdigit() for n in numbers):
            cost, inputs, outputs, requests = (int(n) for n in numbers)
            found[_text(model)] = ModelUsage(cost, inputs, outputs, requests)
    return dict(sorted(found.items(), key=lambda item: (-item[1].cost_micro, item[0])))


def models_json(models: ModelsUsage) -> dict[str, Any]:
    return {model: usage.to_json() for model, usage in models.items()}


@dataclass(frozen=True, slots=True)
class CapState:
    name: str  # "limit" or "spend_caps[i]"
    amount_micro: int
    period: str  # daily | weekly | monthly | total
    counted_micro: int  # spend that counts against it in its current period
    resets_at_ms: int | None  # None: a cap over all time never resets

    @property
    def remaining_micro(self) -> int:
        return max(0, self.amount_micro - self.counted_micro)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "amount": from_micro(self.amount_micro),
            "period": self.period,
            "used": from_micro(self.counted_micro),
            "remaining": from_micro(self.remaining_micro),
            "resets_at": rfc3339(self.resets_at_ms),
        }


@dataclass(frozen=True, slots=True)
class UsageReport:
    status: str  # ok | disabled | expired (not_found never makes a report)
    now_ms: int
    record: KeyRecord
    usage_micro: dict[str, int]  # daily, weekly, monthly, total
    byok_micro: dict[str, int]
    resets_at_ms: dict[str, int]  # daily, weekly, monthly: when the current bucket ends
    caps: tuple[CapState, ...]
    rate_tat_us: int | None  # GCRA theoretical arrival time, None when idle
    models: dict[str, ModelsUsage]  # daily, weekly, monthly: usage per model

    @classmethod
    def from_reply(cls, reply: list[Any]) -> UsageReport:
        """Parse report.lua's reply (status other than not_found)."""
        flat_caps = [_text(v) for v in reply[5]]
        caps = tuple(
            CapState(
                name=flat_caps[i],
                amount_micro=int(flat_caps[i + 1]),
                period=flat_caps[i + 2],
                counted_micro=int(flat_caps[i + 3]),
                resets_at_ms=int(flat_caps[i + 4]) or None,
            )
            for i in range(0, len(flat_caps), 5)
        )
        values = [int(v) for v in reply[3]]
        ends = [int(v) for v in reply[4]]
        return cls(
            status=_text(reply[0]),
            now_ms=int(reply[1]),
            record=decode(pairs_to_dict(reply[2])),
            usage_micro=dict(zip(_ORDER, values[:4], strict=True)),
            byok_micro=dict(zip(_ORDER, values[4:], strict=True)),
            resets_at_ms=dict(zip(_ORDER[:3], ends, strict=True)),
            caps=caps,
            rate_tat_us=None if reply[6] is None else int(float(_text(reply[6]))),
            models=dict(zip(MODEL_PERIODS, (models_from_hash(m) for m in reply[7]), strict=True)),
        )

    @property
    def limit_remaining_micro(self) -> int | None:
        """OpenRouter's limit_remaining: room left under ``limit`` alone (null: no limit)."""
        for cap in self.caps:
            if cap.name == "limit":
                return cap.remaining_micro
        return None

    def rate_state(self) -> dict[str, Any] | None:
        """Requests left now and when the key's own rate limit is whole again."""
        spec = self.record.rate_limit
        if spec is None:
            return None
        interval = math.ceil(spec.period_seconds * 1_000_000 / spec.requests)
        now_us = self.now_ms * 1000
        tat = max(self.rate_tat_us or 0, now_us)
        remaining = (now_us - (tat - interval * spec.requests)) // interval
        return {
            "requests": spec.requests,
            "period_seconds": spec.period_seconds,
            "remaining": max(0, min(spec.requests, remaining)),
            "full_at": rfc3339(math.ceil(tat / 1000)),
        }

    def to_json(self) -> dict[str, Any]:
        """The record with its derived usage fields (docs/architecture.md): never a secret."""
        body = self.record.to_json(self.now_ms)
        usage, byok = self.usage_micro, self.byok_micro
        body.update(
            limit_remaining=from_micro(self.limit_remaining_micro),
            usage=from_micro(usage["total"]),
            usage_daily=from_micro(usage["daily"]),
            usage_weekly=from_micro(usage["weekly"]),
            usage_monthly=from_micro(usage["monthly"]),
            byok_usage=from_micro(byok["total"]),
            byok_usage_daily=from_micro(byok["daily"]),
            byok_usage_weekly=from_micro(byok["weekly"]),
            byok_usage_monthly=from_micro(byok["monthly"]),
            usage_resets_at={p: rfc3339(at) for p, at in self.resets_at_ms.items()},
            caps=[cap.to_json() for cap in self.caps],
            rate_limit_state=self.rate_state(),
            usage_by_model={p: models_json(self.models[p]) for p in MODEL_PERIODS},
        )
        return body


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
