"""Validation of key fields from the management API and the CLI.

Each field is declared once, with its JSON Schema (served in /openapi.json) and the parser
that turns a JSON value into the canonical stored value. Every problem names its field;
all problems are reported together, and nothing is written unless all fields are valid.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway.scope_rule import SCOPE_PATTERN, parse_scope
from gateway.store.record import (
    KEY_TYPES,
    MICRO,
    PERIODS,
    RateLimitSpec,
    SpendCap,
    TokenLimitSpec,
)
from gateway.store.secrets import has_bad_checksum

Mode = Literal["create", "import", "update"]
MAX_MONEY = 1_000_000_000  # credits; keeps micro-units exact in Lua's doubles (< 2**53)
MAX_NAME = 256
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last instant RFC 3339 shows
WORKSPACE_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
# An imported secret: visible ASCII (what fits in an HTTP header), at least 16 characters.
# Its masks show up to a third of it, so 16 leave 11 unknown; a shorter one is guessable.
MIN_IMPORTED_SECRET = 16
MAX_SECRET = 512
SECRET_PATTERN = rf"^[\x21-\x7e]{{{MIN_IMPORTED_SECRET},{MAX_SECRET}}}$"
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")


class InvalidInput(Exception):
    """One or more fields are invalid; ``errors`` holds (field, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    stored_as: str
    schema: dict[str, Any]
    parse: Callable[[Any, int], Any]
    description: str
    nullable: bool = False
    modes: tuple[Mode, ...] = ("create", "import", "update")

    def json_schema(self) -> dict[str, Any]:
        schema = {**self.schema, "description": self.description}
        if self.nullable:
            return {"anyOf": [self.schema, {"type": "null"}], "description": self.description}
        return schema


def _text(max_length: int, pattern: str | None = None) -> Callable[[Any, int], str]:
    compiled = re.compile(pattern) if pattern else None

    def parse(value: Any, _now: int) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if len(value) > max_length:
            raise ValueError(f"must be at most {max_length} characters")
        if compiled is not None and not compiled.fullmatch(value):
            raise ValueError(f"must match {pattern}")
        return value

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[Any, int], str]:
    def parse(value: Any, _now: int) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(value)

    return parse


def _bool(value: Any, _now: int) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _number(
    value: Any, *, low: float = 0.0, high: float = MAX_MONEY, open_low: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    if not math.isfinite(value):
        raise ValueError("must be finite")
    if value < low or (open_low and value == low):
        raise ValueError(f"must be {'greater than' if open_low else 'at least'} {low:g}")
    if value > high:
        raise ValueError(f"must be at most {high:g}")
    return float(value)


def _money(value: Any, _now: int) -> int:
    return round(_number(value) * MICRO)


def _string_list(
    max_items: int, item: Callable[[Any, int], str]
) -> Callable[[Any, int], tuple[str, ...]]:
    def parse(value: Any, now: int) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError("must be a list of strings")
        if len(value) > max_items:
            raise ValueError(f"must have at most {max_items} items")
        items = []
        for i, entry in enumerate(value):
            try:
                items.append(item(entry, now))
            except ValueError as exc:
                raise ValueError(f"item {i} {exc}") from None
        return tuple(dict.fromkeys(items))  # duplicates collapse, order kept

    return parse


def _uuid(value: Any, _now: int) -> str:
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else _raise("must be a UUID")
    except ValueError:
        raise ValueError("must be a UUID") from None


def _imported_secret(value: Any, _now: int) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) < MIN_IMPORTED_SECRET:
        raise ValueError(
            f"must be at least {MIN_IMPORTED_SECRET} characters: a shorter secret can be "
            "guessed; give its sha256 instead to adopt it anyway"
        )
    if len(value) > MAX_SECRET:
        raise ValueError(f"must be at most {MAX_SECRET} characters")
    if not _VISIBLE_ASCII.fullmatch(value):
        raise ValueError("must be visible ASCII characters only: no spaces or control characters")
    return value


def _raise(message: str) -> str:
    raise ValueError(message)


def _expires_at(value: Any, now: int) -> int:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string")
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise ValueError("must be an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z") from None
    if moment.tzinfo is None:
        raise ValueError("must carry a time zone offset, e.g. Z or +02:00")
    ms = int(moment.timestamp() * 1000)
    if ms <= now:
        raise ValueError("must be in the future")
    if ms > MAX_TIME_MS:
        raise ValueError("must be before year 10000 UTC")
    return ms


def _spend_caps(value: Any, _now: int) -> tuple[SpendCap, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of {amount, period}")
    if len(value) > 8:
        raise ValueError("must have at most 8 caps")
    caps = []
    for i, cap in enumerate(value):
        if not isinstance(cap, dict) or set(cap) != {"amount", "period"}:
            raise ValueError(f"item {i} must be an object with exactly amount and period")
        if cap["period"] not in (*PERIODS, "total"):
            raise ValueError(f"item {i} period must be one of {', '.join((*PERIODS, 'total'))}")
        try:
            caps.append(SpendCap(_money(cap["amount"], 0), cap["period"]))
        except ValueError as exc:
            raise ValueError(f"item {i} amount {exc}") from None
    return tuple(caps)


def _rate_limit(value: Any, _now: int) -> RateLimitSpec:
    if not isinstance(value, dict) or set(value) != {"requests", "period_seconds"}:
        raise ValueError("must be an object with exactly requests and period_seconds")
    requests = value["requests"]
    if (
        isinstance(requests, bool)
        or not isinstance(requests, int)
        or not 1 <= requests <= 1_000_000_000
    ):
        raise ValueError("requests must be an integer from 1 to 1000000000")
    try:
        period = _number(value["period_seconds"], high=31_622_400, open_low=True)
    except ValueError as exc:
        raise ValueError(f"period_seconds {exc}") from None
    return RateLimitSpec(requests, period)


MAX_IN_FLIGHT = 1_000_000
MAX_TOKENS_PER_WINDOW = 1_000_000_000_000  # exact in the script's doubles, far past any use
MAX_TOKEN_LIMITS = 4


def _token_limits(value: Any, _now: int) -> tuple[TokenLimitSpec, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of {tokens, period_seconds}")
    if len(value) > MAX_TOKEN_LIMITS:
        raise ValueError(f"must have at most {MAX_TOKEN_LIMITS} limits")
    limits = []
    for i, limit in enumerate(value):
        if not isinstance(limit, dict) or set(limit) != {"tokens", "period_seconds"}:
            raise ValueError(f"item {i} must be an object with exactly tokens and period_seconds")
        tokens = limit["tokens"]
        if (
            isinstance(tokens, bool)
            or not isinstance(tokens, int)
            or not 1 <= tokens <= MAX_TOKENS_PER_WINDOW
        ):
            raise ValueError(
                f"item {i} tokens must be an integer from 1 to {MAX_TOKENS_PER_WINDOW}"
            )
        try:
            period = _number(limit["period_seconds"], high=31_622_400, open_low=True)
        except ValueError as exc:
            raise ValueError(f"item {i} period_seconds {exc}") from None
        if period < 0.001:
            raise ValueError(f"item {i} period_seconds must be at least 0.001")
        limits.append(TokenLimitSpec(tokens, period))
    return tuple(limits)


def _max_in_flight(value: Any, _now: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IN_FLIGHT:
        raise ValueError(f"must be an integer from 1 to {MAX_IN_FLIGHT} (null: no limit)")
    return value


def _metadata(value: Any, _now: int) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("must be an object of string values")
    if len(value) > 64:
        raise ValueError("must have at most 64 entries")
    for key, item in value.items():
        if not 1 <= len(key) <= 128:
            raise ValueError("keys must be 1 to 128 characters")
        if not isinstance(item, str) or len(item) > 1024:
            raise ValueError(f"value of {key!r} must be a string of at most 1024 characters")
    return dict(value)


_MONEY_SCHEMA = {"type": "number", "minimum": 0, "maximum": MAX_MONEY}
_STRINGS = {"type": "array", "items": {"type": "string"}}
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "name",
        "name",
        {"type": "string", "maxLength": MAX_NAME},
        _text(MAX_NAME),
        "Display name.",
        nullable=True,
    ),
    FieldSpec(
        "user_id",
        "user_id",
        {"type": "string", "format": "uuid"},
        _uuid,
        "Owner. Defaults to the caller's user.",
        modes=("create", "import"),
    ),
    FieldSpec(
        "workspace_id",
        "workspace_id",
        {"type": "string", "pattern": WORKSPACE_PATTERN},
        _text(128, WORKSPACE_PATTERN),
        "Workspace. Defaults to the caller's; another one needs org:admin.",
        modes=("create", "import"),
    ),
    FieldSpec(
        "team_name",
        "team_name",
        {"type": "string", "maxLength": MAX_NAME},
        _text(MAX_NAME),
        "Team shown by the Baseten dialect.",
        nullable=True,
    ),
    FieldSpec(
        "type",
        "type",
        {"type": "string", "enum": list(KEY_TYPES)},
        _choice(KEY_TYPES),
        "Key type (Baseten's enum).",
    ),
    FieldSpec(
        "scopes",
        "scopes",
        {**_STRINGS, "maxItems": 64, "items": {"type": "string", "pattern": SCOPE_PATTERN}},
        _string_list(64, parse_scope),
        "Granted scopes; 'x:*' and '*' are wildcards. A caller grants only what it holds.",
    ),
    FieldSpec(
        "resources",
        "resources",
        {**_STRINGS, "maxItems": 1024, "items": {"type": "string", "maxLength": 256}},
        _string_list(1024, _text(256)),
        "Allow-list of resources (e.g. model ids); null: any.",
        nullable=True,
    ),
    FieldSpec(
        "disabled", "disabled", {"type": "boolean"}, _bool, "A disabled key is refused (403)."
    ),
    FieldSpec(
        "expires_at",
        "expires_at",
        {"type": "string", "format": "date-time"},
        _expires_at,
        "RFC 3339 expiry, in the future; null: never.",
        nullable=True,
    ),
    FieldSpec(
        "limit",
        "limit_micro",
        _MONEY_SCHEMA,
        _money,
        "Spending limit in credits for each limit_reset period; null: none.",
        nullable=True,
    ),
    FieldSpec(
        "limit_reset",
        "limit_reset",
        {"type": "string", "enum": list(PERIODS)},
        _choice(PERIODS),
        "When the limit starts afresh (UTC); null: never.",
        nullable=True,
    ),
    FieldSpec(
        "include_byok_in_limit",
        "include_byok_in_limit",
        {"type": "boolean"},
        _bool,
        "Whether BYOK usage counts against limit.",
    ),
    FieldSpec(
        "spend_caps",
        "spend_caps",
        {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["amount", "period"],
                "properties": {
                    "amount": _MONEY_SCHEMA,
                    "period": {"type": "string", "enum": [*PERIODS, "total"]},
                },
            },
        },
        _spend_caps,
        "Extra spending caps; every one must hold.",
    ),
    FieldSpec(
        "rate_limit",
        "rate_limit",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["requests", "period_seconds"],
            "properties": {
                "requests": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000},
                "period_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 31_622_400},
            },
        },
        _rate_limit,
        "Requests allowed per period; null: the route's default.",
        nullable=True,
    ),
    FieldSpec(
        "max_in_flight",
        "max_in_flight",
        {"type": "integer", "minimum": 1, "maximum": MAX_IN_FLIGHT},
        _max_in_flight,
        "Requests of this key in flight at once, on every replica together; one more is "
        "refused (429 concurrency_limited). null: no limit.",
        nullable=True,
    ),
    FieldSpec(
        "token_limits",
        "token_limits",
        {
            "type": "array",
            "maxItems": MAX_TOKEN_LIMITS,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["tokens", "period_seconds"],
                "properties": {
                    "tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_PER_WINDOW},
                    "period_seconds": {
                        "type": "number",
                        "minimum": 0.001,
                        "maximum": 31_622_400,
                    },
                },
            },
        },
        _token_limits,
        "LLM tokens (input plus output) per fixed window of period_seconds, on LLM routes; "
        "every limit must hold (429 token_rate_limited). [] : none.",
    ),
    FieldSpec(
        "metadata",
        "metadata",
        {
            "type": "object",
            "maxProperties": 64,
            "additionalProperties": {"type": "string", "maxLength": 1024},
            "propertyNames": {"minLength": 1, "maxLength": 128},
        },
        _metadata,
        "Free-form string pairs.",
    ),
)
IMPORT_ONLY: tuple[FieldSpec, ...] = (
    FieldSpec(
        "key",
        "key",
        {"type": "string", "pattern": SECRET_PATTERN},
        _imported_secret,
        f"The existing secret to adopt ({MIN_IMPORTED_SECRET}-{MAX_SECRET} visible ASCII "
        "characters). One shaped like a keygate secret (the configured prefix and length) "
        "must carry a valid checksum.",
        modes=("import",),
    ),
    FieldSpec(
        "sha256",
        "sha256",
        {"type": "string", "pattern": SHA256_PATTERN},
        _text(64, SHA256_PATTERN),
        "Or only its sha256, hex (then keygate never sees the secret and shows none of it).",
        modes=("import",),
    ),
)
_BY_NAME = {spec.name: spec for spec in (*FIELDS, *IMPORT_ONLY)}


def fields_for(mode: Mode) -> tuple[FieldSpec, ...]:
    return tuple(spec for spec in (*FIELDS, *IMPORT_ONLY) if mode in spec.modes)


def parse(
    body: Mapping[str, Any], mode: Mode, now_ms: int, *, secret_prefix: str | None = None
) -> dict[str, Any]:
    """Validate a JSON object; returns canonical values keyed by stored field name.

    A null for a nullable field is kept as None (update clears it). Raises InvalidInput.
    ``secret_prefix`` (``keys.secret_prefix``) is required to import: an imported secret
    shaped like a keygate secret with a wrong checksum is refused, because the proxy
    refuses such a secret on every request without looking it up.
    """
    if mode == "import" and not secret_prefix:
        raise TypeError("parse: secret_prefix is required to import")
    errors: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    allowed = {spec.name for spec in fields_for(mode)}
    for name, value in body.items():
        spec = _BY_NAME.get(name)
        if spec is None or name not in allowed:
            errors.append((name, "unknown field" if spec is None else f"cannot be set on {mode}"))
            continue
        if value is None:
            if spec.nullable:
                values[spec.stored_as] = None
            else:
                errors.append((name, "must not be null"))
            continue
        try:
            values[spec.stored_as] = spec.parse(value, now_ms)
        except ValueError as exc:
            errors.append((name, str(exc)))
    if mode == "import" and ("key" in body) == ("sha256" in body):
        errors.append(("key", "give exactly one of key or sha256"))
    secret = values.get("key")
    if secret_prefix and secret is not None and has_bad_checksum(secret, secret_prefix):
        errors.append(
            (
                "key",
                f"has keygate's secret prefix {secret_prefix!r} and length but a wrong "
                "checksum (a mistyped keygate key?), so the gateway would refuse it on every "
                "request; if the old API's keys start with this prefix too, set "
                "keys.secret_prefix to another one",
            )
        )
    if mode == "update" and not body:
        errors.append(("body", "names no field to change"))
    if errors:
        raise InvalidInput(errors)
    if "sha256" in values:
        values["sha256"] = values["sha256"].lower()
    return values
