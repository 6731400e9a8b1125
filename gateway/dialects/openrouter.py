"""OpenRouter: ``/api/v1/keys`` with ``Authorization: Bearer`` (docs/dialects.md).

Served, from the configured listing path P (default ``/api/v1/keys``):

- ``GET P``: the caller's workspace keys, oldest first, 100 a page: ``?offset=`` (keys to
  skip), ``?include_disabled=true`` (disabled keys are left out unless asked for).
- ``POST P``, ``GET|PATCH|DELETE P/{hash}``: OpenRouter's provisioning API; a key is
  named by ``key_hash`` (its id's hex digits, never anything derived from the secret), and
  only keys of the caller's workspace exist.
- ``GET dirname(P)/key``: the calling key itself, which any valid key may read.

Items carry the seed's fields plus the ones the official SDK (``openrouter`` 1.3.84)
requires to parse a reply (``creator_user_id``, ``external_user``, ``last_used_at``,
``workspace_id``), all from the canonical record. Errors are OpenRouter's
``{"error": {"code": <HTTP status>, "message": ...}}``.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from typing import Any, cast

from aiohttp import web

from gateway.bodies import NotJson, parse_json, read_capped
from gateway.dialects.base import VIEW, Call, DialectSpec, Endpoint, Handler, json_response
from gateway.dialects.listing import window
from gateway.policies import allowance
from gateway.policies.scopes import grants, is_privileged
from gateway.store import input as key_input
from gateway.store.record import KeyRecord, from_micro, rfc3339
from gateway.store.report import CapState, UsageReport

PAGE = 100  # OpenRouter's page size; offsets are counted in keys, not pages
MAX_BODY = 64 * 1024
CREATE, UPDATE, DELETE = "apikeys:create", "apikeys:update", "apikeys:delete"
MANAGEMENT = (VIEW, CREATE, UPDATE, DELETE)
_HASH = re.compile(r"^[0-9a-f]{32}$")  # key_hash: a key id's hex digits
_FLAGS = {"true": True, "false": False}
# The body fields keygate can honour; others (``external``, ...) are refused, not dropped.
_CREATE_FIELDS = {"name", "limit", "limit_reset", "include_byok_in_limit", "expires_at"}
_UPDATE_FIELDS = {"name", "disabled", "limit", "limit_reset", "include_byok_in_limit"}
# What GET /api/v1/key shares with a listed key (the SDK's GetCurrentKeyData).
_CURRENT_SHARED = (
    "label",
    "limit",
    "limit_remaining",
    "limit_reset",
    "include_byok_in_limit",
    "usage",
    "usage_daily",
    "usage_weekly",
    "usage_monthly",
    "byok_usage",
    "byok_usage_daily",
    "byok_usage_weekly",
    "byok_usage_monthly",
    "expires_at",
    "creator_user_id",
    "workspace_id",
)


class Refused(Exception):
    """Ends a call with an error in OpenRouter's shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, code: str, message: str) -> web.Response:
    # OpenRouter's code is the HTTP status itself; keygate's outcome name is not sent.
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


# --- rendering ---------------------------------------------------------------------------


def key_hash(record: KeyRecord) -> str:
    """The ``hash`` that names a key here: the 32 hex digits of its id, stable across
    rotations. OpenRouter's own is the sha256 of the secret; served to every
    ``apikeys:view`` key, that would give a short imported secret away offline."""
    return record.id.replace("-", "")


def key_json(record: KeyRecord, report: UsageReport) -> dict[str, Any]:
    """One key as OpenRouter lists it (the seed's fields, then the SDK's extra ones)."""
    usage, byok = report.usage_micro, report.byok_micro
    return {
        "hash": key_hash(record),
        "name": record.name or "",  # the seed's name is a string, never null
        "label": record.label,
        "disabled": record.disabled,
        "limit": from_micro(record.limit_micro),
        "limit_remaining": from_micro(report.limit_remaining_micro),
        "limit_reset": record.limit_reset,
        "include_byok_in_limit": record.include_byok_in_limit,
        "usage": from_micro(usage["total"]),
        "usage_daily": from_micro(usage["daily"]),
        "usage_weekly": from_micro(usage["weekly"]),
        "usage_monthly": from_micro(usage["monthly"]),
        "byok_usage": from_micro(byok["total"]),
        "byok_usage_daily": from_micro(byok["daily"]),
        "byok_usage_weekly": from_micro(byok["weekly"]),
        "byok_usage_monthly": from_micro(byok["monthly"]),
        "created_at": rfc3339(record.created_at),
        "updated_at": rfc3339(record.updated_at),
        "expires_at": rfc3339(record.expires_at),
        "creator_user_id": record.user_id,
        "external_user": None,  # keygate has no partner-defined identities
        "last_used_at": rfc3339(record.last_used_at),
        "workspace_id": record.workspace_id,
    }


def _budget(cap: CapState, include_byok: bool) -> dict[str, Any]:
    spent = from_micro(cap.counted_micro) or 0.0
    amount = from_micro(cap.amount_micro) or 0.0
    return {
        "budget_id": None,
        "guardrail_id": None,
        "include_byok": include_byok,
        "limit_usd": amount,
        "remaining_usd": amount - spent,
        "reset_interval": None if cap.period == "total" else cap.period,
        "resets_at": rfc3339(cap.resets_at_ms),
        # ``limit`` is the key's own limit; keygate's extra spend caps are per-key guardrails.
        "scope": "key_limit" if cap.name == "limit" else "api_key",
        "spend_usd": spent,
    }


def current_key_json(report: UsageReport) -> dict[str, Any]:
    """``GET /api/v1/key``: the calling key, with the fields OpenRouter's SDK requires."""
    record = report.record
    item = key_json(record, report)
    budgets = [_budget(cap, record.include_byok_in_limit) for cap in report.caps]
    # The budget that blocks first: one already spent, else the one with least room.
    effective = min(
        budgets, key=lambda b: (b["remaining_usd"] > 0, b["remaining_usd"]), default=None
    )
    management = any(grants(record.scopes, scope) for scope in MANAGEMENT)
    rate = record.rate_limit
    return {
        **{name: item[name] for name in _CURRENT_SHARED},
        "allowed_data_regions": ["global"],  # keygate applies no region policy
        "budgets": budgets,
        "effective_budget": effective,
        "free_model_daily_requests": {"limit": 0, "remaining": 0, "used": 0},
        "is_free_tier": False,
        "is_management_key": management,
        "is_provisioning_key": management,
        "organization_id": None,
        "rate_limit": {
            "requests": rate.requests if rate else -1,
            "interval": f"{rate.period_seconds:g}s" if rate else "10s",
            "note": "keygate's rate limit for this key"
            if rate
            else "this key has no rate limit of its own; each route's applies",
        },
    }


# --- reading a call ----------------------------------------------------------------------


def _flag(call: Call, name: str) -> bool:
    raw = call.request.query.get(name, "false")
    if raw.lower() not in _FLAGS:
        raise Refused(400, f"{name} must be 'true' or 'false'")
    return _FLAGS[raw.lower()]


def _offset(call: Call) -> int:
    raw = call.request.query.get("offset", "0")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise Refused(400, "offset must be a non-negative integer")
    return int(raw)


def _same_workspace(call: Call, value: object) -> None:
    """OpenRouter lets a caller name a workspace; keygate's dialect sees only its own."""
    if value is not None and value != call.caller.workspace_id:
        raise Refused(403, "workspace_id: this key can only reach its own workspace")


async def _body(call: Call, allowed: set[str]) -> dict[str, Any]:
    request = call.request
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Refused(413, f"the body exceeds {MAX_BODY} bytes")
    raw = await read_capped(request.content, MAX_BODY)
    if raw is None:
        raise Refused(413, f"the body exceeds {MAX_BODY} bytes")
    try:
        # Refused too: a lone surrogate (no text to store) and deep nesting, before any write.
        body = parse_json(raw or b"{}")
    except NotJson as exc:
        raise Refused(400, f"the body is refused: {exc}") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    _same_workspace(call, body.pop("workspace_id", None))
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Refused(400, f"{', '.join(unknown)}: not supported by keygate")
    return cast(dict[str, Any], body)


def _parse(body: dict[str, Any], mode: key_input.Mode, now_ms: int) -> dict[str, Any]:
    try:
        return key_input.parse(body, mode, now_ms)
    except key_input.InvalidInput as exc:
        raise Refused(400, "; ".join(f"{f}: {m}" for f, m in exc.errors)) from None


async def _target(call: Call, *, manage: bool) -> KeyRecord:
    """The key the path's hash names, in the caller's workspace (404 otherwise).

    To manage it, the caller must hold every privileged scope it has, as on the admin
    API: otherwise a key with ``apikeys:delete`` could remove a more powerful one."""
    named = call.params.get("hash", "")
    record = None
    if _HASH.fullmatch(named):  # fullmatch: "$" would let a trailing newline through
        record = await call.store.get(str(uuid.UUID(named)), call.caller.workspace_id)
    if record is None:
        raise Refused(404, "no API key with this hash")
    if manage:
        beyond = [
            s for s in record.scopes if is_privileged(s) and not grants(call.caller.scopes, s)
        ]
        if beyond:
            raise Refused(403, f"this key holds {', '.join(beyond)}, which the caller lacks")
    return record


async def _bounded(
    call: Call, values: dict[str, Any], held: KeyRecord | None = None
) -> dict[str, Any]:
    """The cap fields to write for a key the caller creates (``held`` None) or edits: the
    body's own, none above the caller's remaining allowance, plus what the key inherits
    of it (docs/dialects.md). A looser ``limit`` is 403, as for a scope the caller lacks."""
    room = await allowance.of_creator(call.store, call.caller)
    if room is None:  # revoked since it was authenticated
        raise Refused(401, "the API key is not valid")
    found = allowance.bound(room, values, held)
    if isinstance(found, list):
        raise Refused(403, "; ".join(refusal.detail for refusal in found))
    return found


async def _render(call: Call, record: KeyRecord) -> dict[str, Any]:
    _, report = await call.store.report(record.id, call.caller.workspace_id)
    if report is None:
        raise Refused(404, "no API key with this hash")
    return key_json(report.record, report)


# --- handlers ----------------------------------------------------------------------------


async def list_keys(call: Call) -> web.Response:
    include_disabled = _flag(call, "include_disabled")
    _flag(call, "include_expired")  # validated; expired keys are always listed (the seed)
    offset = _offset(call)
    _same_workspace(call, call.request.query.get("workspace_id"))
    records = await window(
        call.store,
        call.caller.workspace_id,
        offset=offset,
        limit=PAGE,
        include_disabled=include_disabled,
    )
    # One pipelined round trip for the page's usage; a key revoked since is left out.
    reports = await call.store.reports([r.id for r in records])
    data = [key_json(reports[r.id].record, reports[r.id]) for r in records if r.id in reports]
    return json_response({"data": data})


async def create_key(call: Call) -> web.Response:
    body = await _body(call, _CREATE_FIELDS | {"creator_user_id"})
    creator = body.pop("creator_user_id", None)
    if creator is not None and creator != call.caller.user_id:
        raise Refused(403, "creator_user_id: keys are created for the caller's own user")
    if not isinstance(body.get("name"), str) or not body["name"]:
        raise Refused(400, "name: required, a non-empty string")
    values = _parse(body, "create", call.now_ms)
    values.update(workspace_id=call.caller.workspace_id, user_id=call.caller.user_id)
    # OpenRouter's body has no concurrency field: the new key holds to its creator's.
    if call.caller.max_in_flight is not None:
        values["max_in_flight"] = call.caller.max_in_flight
    values.update(await _bounded(call, values))
    issued = await call.store.create(values)
    return json_response(
        {"data": await _render(call, issued.record), "key": issued.secret}, status=201
    )


async def get_key(call: Call) -> web.Response:
    return json_response({"data": await _render(call, await _target(call, manage=False))})


async def update_key(call: Call) -> web.Response:
    body = await _body(call, _UPDATE_FIELDS)
    if body.get("name", "") is None:
        raise Refused(400, "name: must be a string")
    values = _parse(body, "update", call.now_ms)
    target = await _target(call, manage=True)
    if allowance.CAP_FIELDS.intersection(values):
        # Raising a key's limit (the caller's own included) hands out allowance too.
        values.update(await _bounded(call, values, target))
    record = await call.store.update(target.id, values, call.caller.workspace_id)
    if record is None:
        raise Refused(404, "no API key with this hash")
    return json_response({"data": await _render(call, record)})


async def delete_key(call: Call) -> web.Response:
    target = await _target(call, manage=True)
    if not await call.store.revoke(target.id, call.caller.workspace_id):
        raise Refused(404, "no API key with this hash")
    return json_response({"deleted": True})


async def current_key(call: Call) -> web.Response:
    _, report = await call.store.report(call.caller.id)
    if report is None:  # revoked between authentication and now
        raise Refused(401, "the API key is not valid")
    return json_response({"data": current_key_json(report)})


def _refusals(handler: Handler) -> Handler:
    """The handler, with a ``Refused`` turned into OpenRouter's error body."""

    async def run(call: Call) -> web.Response:
        try:
            return await handler(call)
        except Refused as refused:
            return error(refused.status, "", refused.message)

    return run


def endpoints(path: str) -> tuple[Endpoint, ...]:
    one = f"{path}/{{hash}}"
    return (
        Endpoint("GET", path, VIEW, _refusals(list_keys)),
        Endpoint("POST", path, CREATE, _refusals(create_key)),
        Endpoint("GET", one, VIEW, _refusals(get_key)),
        Endpoint("PATCH", one, UPDATE, _refusals(update_key)),
        Endpoint("DELETE", one, DELETE, _refusals(delete_key)),
        # Any valid key may read itself: scope "" makes mount.py check none.
        Endpoint("GET", posixpath.dirname(path) + "/key", "", _refusals(current_key)),
    )


SPEC = DialectSpec(
    name="openrouter",
    default_path="/api/v1/keys",
    sources=("bearer",),
    endpoints=endpoints,
    error=error,
)
