"""Baseten: ``GET /v1/api_keys`` (docs/dialects.md).

Every key of the caller's workspace: ``{"keys": [{prefix, name, type, model_ids, team_name,
created_at, last_used_at, owner}]}``. The seed lists the first five; the ``baseten`` SDK's
``APIKeyInfo`` also *requires* ``created_at``, so the last three are served from the record.
``model_ids`` is the key's allow-list for the two workspace types the seed scopes to models,
and null for every other type.

Auth: ``Authorization: Api-Key K`` (the documented scheme, and what truss sends) or
``Authorization: Bearer K`` (what the ``baseten`` SDK sends); Baseten accepts both.

Query: ``type`` (one category) and ``created_by_me`` (the caller's own keys), as the SDK's
``GetApiKeysParams`` sends them.

Errors: ``{"error": code, "message": description}``: the control plane's shape as the SDK
reads it (``baseten.sandbox._errors``: "The control plane puts the code in error and the
description in message"); truss prints ``message`` of a 4xx.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.dialects.base import VIEW, Call, DialectSpec, Endpoint, json_response
from gateway.dialects.listing import all_keys
from gateway.errors import Outcome
from gateway.store.record import KEY_TYPES, KeyRecord, rfc3339

SCOPED_TYPES = ("WORKSPACE_EXPORT_METRICS", "WORKSPACE_INVOKE")  # types with model_ids
# Categories the SDK may filter by: keygate issues none of the last two, so they match none.
FILTER_TYPES = (*KEY_TYPES, "ROUTES", "WORKSPACE_MANAGE_API_KEYS")
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def key_json(record: KeyRecord) -> dict[str, Any]:
    scoped = record.type in SCOPED_TYPES and record.resources is not None
    return {
        "prefix": record.prefix,
        "name": record.name,
        "type": record.type,
        "model_ids": list(record.resources or ()) if scoped else None,
        "team_name": record.team_name,
        "created_at": rfc3339(record.created_at),
        "last_used_at": rfc3339(record.last_used_at),
        # Baseten names an owner for personal keys only; keygate knows no email or user name.
        "owner": {"user_id": record.user_id} if record.type == "PERSONAL" else None,
    }


async def list_keys(call: Call) -> web.Response:
    query = call.request.query
    wanted = query.get("type")
    if wanted is not None and wanted not in FILTER_TYPES:
        return error(400, Outcome.INVALID_REQUEST.value, f"type must be one of {FILTER_TYPES}")
    mine = _BOOLS.get(query.get("created_by_me", "false").lower())
    if mine is None:
        return error(400, Outcome.INVALID_REQUEST.value, "created_by_me must be true or false")
    records = await all_keys(
        call.store, call.caller.workspace_id, user_id=call.caller.user_id if mine else None
    )
    keys = [key_json(r) for r in records if wanted is None or r.type == wanted]
    return json_response({"keys": keys})


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def endpoints(path: str) -> tuple[Endpoint, ...]:
    return (Endpoint("GET", path, VIEW, list_keys),)


SPEC = DialectSpec(
    name="baseten",
    default_path="/v1/api_keys",
    sources=("api_key_scheme", "bearer"),
    endpoints=endpoints,
    error=error,
)
