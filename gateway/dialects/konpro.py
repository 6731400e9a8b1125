"""Konpro: ``GET /v1/api-keys`` with ``x-api-key`` (docs/dialects.md).

Every key of the caller's account (workspace), without query parameters:
``{"api_keys": [{key_id, name, scopes, last_used, created_at, expires_at, status}]}``;
``status`` is ``active``, or ``inactive`` for a disabled or expired key.
The seed names no error body; errors are ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.dialects.base import VIEW, Call, DialectSpec, Endpoint, json_response
from gateway.dialects.listing import all_keys
from gateway.store.record import KeyRecord, rfc3339


def key_json(record: KeyRecord, now_ms: int) -> dict[str, Any]:
    return {
        "key_id": record.id,
        "name": record.name,
        "scopes": list(record.scopes),
        "last_used": rfc3339(record.last_used_at),
        "created_at": rfc3339(record.created_at),
        "expires_at": rfc3339(record.expires_at),
        "status": "active" if record.status(now_ms) == "active" else "inactive",
    }


async def list_keys(call: Call) -> web.Response:
    records = await all_keys(call.store, call.caller.workspace_id)
    return json_response({"api_keys": [key_json(r, call.now_ms) for r in records]})


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def endpoints(path: str) -> tuple[Endpoint, ...]:
    return (Endpoint("GET", path, VIEW, list_keys),)


SPEC = DialectSpec(
    name="konpro",
    default_path="/v1/api-keys",
    sources=("x-api-key",),
    endpoints=endpoints,
    error=error,
)
