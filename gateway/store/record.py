"""The canonical key record (docs/architecture.md) and its encoding as a Redis hash.

In Redis every field is a string: times are integer milliseconds since the epoch, money is
integer micro-units, lists and maps are JSON. An absent field means null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

MICRO = 1_000_000
KEY_TYPES = ("PERSONAL", "WORKSPACE_MANAGE_ALL", "WORKSPACE_EXPORT_METRICS", "WORKSPACE_INVOKE")
PERIODS = ("daily", "weekly", "monthly")
Status = Literal["active", "disabled", "expired"]


def index_member(created_at_ms: int, key_id: str) -> str:
    """A key's member in the listing indexes: members sort by creation instant then id, so
    a lexicographic cursor never skips or repeats a key."""
    return f"{created_at_ms:015d}:{key_id}"


@dataclass(frozen=True, slots=True)
class SpendCap:
    amount_micro: int
    period: str  # daily | weekly | monthly | total


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    requests: int
    period_seconds: float


@dataclass(frozen=True, slots=True)
class TokenLimitSpec:
    """LLM tokens (input plus output) a key may use per fixed window of ``period_seconds``."""

    tokens: int
    period_seconds: float


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    hash: str
    prefix: str
    label: str
    user_id: str
    workspace_id: str
    created_at: int
    updated_at: int
    name: str | None = None
    team_name: str | None = None
    type: str = "PERSONAL"
    scopes: tuple[str, ...] = ()
    resources: tuple[str, ...] | None = None
    disabled: bool = False
    expires_at: int | None = None
    last_used_at: int | None = None
    total_uses: int = 0
    limit_micro: int | None = None
    limit_reset: str | None = None
    include_byok_in_limit: bool = False
    spend_caps: tuple[SpendCap, ...] = ()
    rate_limit: RateLimitSpec | None = None
    max_in_flight: int | None = None
    token_limits: tuple[TokenLimitSpec, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    imported: bool = False
    grace_hash: str | None = None
    grace_until: int | None = None

    def status(self, now_ms: int) -> Status:
        if self.disabled:
            return "disabled"
        if self.expires_at is not None and now_ms >= self.expires_at:
            return "expired"
        return "active"

    def index_member(self) -> str:
        """This key's member in the listing indexes."""
        return index_member(self.created_at, self.id)

    def to_json(self, now_ms: int) -> dict[str, Any]:
        """The public view: never a secret, never the grace hash."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "label": self.label,
            "hash": self.hash,
            "user_id": self.user_id,
            "workspace_id": self.workspace_id,
            "team_name": self.team_name,
            "type": self.type,
            "scopes": list(self.scopes),
            "resources": None if self.resources is None else list(self.resources),
            "disabled": self.disabled,
            "status": self.status(now_ms),
            "expires_at": rfc3339(self.expires_at),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "last_used_at": rfc3339(self.last_used_at),
            "total_uses": self.total_uses,
            "limit": from_micro(self.limit_micro),
            "limit_reset": self.limit_reset,
            "include_byok_in_limit": self.include_byok_in_limit,
            "spend_caps": [
                {"amount": from_micro(c.amount_micro), "period": c.period} for c in self.spend_caps
            ],
            "rate_limit": None
            if self.rate_limit is None
            else {
                "requests": self.rate_limit.requests,
                "period_seconds": self.rate_limit.period_seconds,
            },
            "max_in_flight": self.max_in_flight,
            "token_limits": [
                {"tokens": t.tokens, "period_seconds": t.period_seconds} for t in self.token_limits
            ],
            "metadata": dict(self.metadata),
            "imported": self.imported,
        }


def rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    text = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def from_micro(value: int | None) -> float | None:
    return None if value is None else value / MICRO


def encode_fields(values: dict[str, Any]) -> dict[str, str]:
    """Canonical Python values (as produced by store.input) -> Redis hash strings.

    ``None`` values are left out: the caller clears those fields.
    """
    encoded: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name == "spend_caps":
            encoded[name] = json.dumps([[c.amount_micro, c.period] for c in value])
        elif name == "rate_limit":
            encoded[name] = json.dumps([value.requests, value.period_seconds])
        elif name == "token_limits":
            if value:  # none: the field is cleared (the script tests its presence)
                encoded[name] = json.dumps([[t.tokens, t.period_seconds] for t in value])
        elif isinstance(value, bool):
            encoded[name] = "1" if value else "0"
        elif isinstance(value, tuple | list | dict):
            encoded[name] = json.dumps(list(value) if isinstance(value, tuple) else value)
        else:
            encoded[name] = str(value)
    return encoded


def decode(raw: dict[str, str]) -> KeyRecord:
    """Redis hash (decoded strings) -> KeyRecord."""

    def opt_int(name: str) -> int | None:
        value = raw.get(name)
        return None if value is None else int(value)

    resources = raw.get("resources")
    rate = raw.get("rate_limit")
    return KeyRecord(
        id=raw["id"],
        hash=raw["hash"],
        prefix=raw.get("prefix", ""),
        label=raw.get("label", ""),
        user_id=raw["user_id"],
        workspace_id=raw["workspace_id"],
        created_at=int(raw["created_at"]),
        updated_at=int(raw["updated_at"]),
        name=raw.get("name"),
        team_name=raw.get("team_name"),
        type=raw.get("type", "PERSONAL"),
        scopes=tuple(json.loads(raw.get("scopes", "[]"))),
        resources=None if resources is None else tuple(json.loads(resources)),
        disabled=raw.get("disabled") == "1",
        expires_at=opt_int("expires_at"),
        last_used_at=opt_int("last_used_at"),
        total_uses=int(raw.get("total_uses", "0")),
        limit_micro=opt_int("limit_micro"),
        limit_reset=raw.get("limit_reset"),
        include_byok_in_limit=raw.get("include_byok_in_limit") == "1",
        spend_caps=tuple(SpendCap(int(a), p) for a, p in json.loads(raw.get("spend_caps", "[]"))),
        rate_limit=None if rate is None else RateLimitSpec(*json.loads(rate)),
        max_in_flight=opt_int("max_in_flight"),
        token_limits=tuple(
            TokenLimitSpec(int(n), float(p)) for n, p in json.loads(raw.get("token_limits", "[]"))
        ),
        metadata=json.loads(raw.get("metadata", "{}")),
        imported=raw.get("imported") == "1",
        grace_hash=raw.get("grace_hash"),
        grace_until=opt_int("grace_until"),
    )


def pairs_to_dict(flat: list[Any]) -> dict[str, str]:
    """HGETALL-style flat reply ``[k1, v1, k2, v2]`` (bytes or str) -> dict of str."""
    text = [item.decode() if isinstance(item, bytes) else str(item) for item in flat]
    return dict(zip(text[::2], text[1::2], strict=True))
