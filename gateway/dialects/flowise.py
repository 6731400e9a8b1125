"""Flowise: ``GET /api/v1/apikey`` with ``Authorization: Bearer`` (docs/dialects.md).

A bare JSON array ``[{id, keyName, apiKey, permissions, createdDate, updatedDate,
workspaceId}]``, oldest first, of the caller's workspace; ``apiKey`` is the masked label and
``permissions`` are the key's scopes. Query parameters:

- ``type=organization``: every workspace's keys; needs ``org:admin`` (else 403). An empty
  ``type`` is no filter (Flowise tests the parameter for truthiness); any other value is 400.
- ``page`` (default 1) and ``limit`` (default 50): whole numbers >= 1, else 400 naming the
  parameter; ``limit`` above ``MAX_LIMIT`` is clamped; a page past the end is ``[]``.

Errors are the body of Flowise's ``errorHandlerMiddleware``:
``{"statusCode", "success": false, "message", "stack": {}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from gateway.dialects.base import VIEW, Call, DialectSpec, Endpoint, json_response
from gateway.dialects.listing import window
from gateway.policies.scopes import ORG_ADMIN, grants
from gateway.store.record import KeyRecord, rfc3339

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000  # one page never costs more than one store batch
# Longer numbers are only "past the end" (page) or "clamped" (limit); capping the digits
# read keeps int() away from Python's int-from-string size limit.
_MAX_DIGITS = 18


@dataclass(frozen=True, slots=True)
class Query:
    organization: bool
    page: int
    limit: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.limit


def _whole(query: MultiMapping[str], name: str, default: int) -> int | None:
    """A whole number >= 1 (``default`` when absent or empty), or None when it is not one."""
    raw = query.get(name, "")
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):
        return None
    digits = raw.lstrip("0")
    if not digits:
        return None  # zero
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_query(query: MultiMapping[str]) -> Query | str:
    """The listing asked for, or the 400 message naming the parameter that is wrong."""
    kind = query.get("type", "")
    if kind not in ("", "organization"):
        return "type must be 'organization' when given"
    page = _whole(query, "page", 1)
    if page is None:
        return "page must be a whole number of at least 1"
    limit = _whole(query, "limit", DEFAULT_LIMIT)
    if limit is None:
        return "limit must be a whole number of at least 1"
    return Query(kind == "organization", page, min(limit, MAX_LIMIT))


def key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "keyName": record.name or "",  # Flowise names every key; the seed types it string
        "apiKey": record.label,  # masked: the secret is only shown at creation
        "permissions": list(record.scopes),
        "createdDate": rfc3339(record.created_at),
        "updatedDate": rfc3339(record.updated_at),
        "workspaceId": record.workspace_id,
    }


async def list_keys(call: Call) -> web.Response:
    asked = parse_query(call.request.query)
    if isinstance(asked, str):
        return error(400, "invalid_request", asked)
    if asked.organization and not grants(call.caller.scopes, ORG_ADMIN):
        return error(403, "insufficient_scope", f"type=organization needs the {ORG_ADMIN} scope")
    workspace = None if asked.organization else call.caller.workspace_id  # None: all
    records = await window(call.store, workspace, offset=asked.offset, limit=asked.limit)
    return json_response([key_json(r) for r in records])


def error(status: int, code: str, message: str) -> web.Response:
    """Flowise's error body; it has no code field, and its stack is {} outside development."""
    body = {"statusCode": status, "success": False, "message": message, "stack": {}}
    return web.json_response(body, status=status)


def endpoints(path: str) -> tuple[Endpoint, ...]:
    return (Endpoint("GET", path, VIEW, list_keys),)


SPEC = DialectSpec(
    name="flowise",
    default_path="/api/v1/apikey",
    sources=("bearer",),
    endpoints=endpoints,
    error=error,
)
