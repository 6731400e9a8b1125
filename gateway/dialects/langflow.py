"""Langflow: ``/api/v1/api_key/`` with ``x-api-key`` or Bearer
(docs/dialects.md; langflow ``api/v1/api_key.py`` and its ``ApiKeyRead`` /
``UnmaskedApiKeyRead`` models).

- ``GET``: the caller's own keys (its user in its workspace), disabled ones included:
  ``{"total_count", "user_id", "api_keys": [{name, last_used_at, total_uses, is_active, id,
  api_key (masked), user_id, created_at}]}``.
- ``POST {"name": ...}``: a new key for the caller's user, answered once with its secret
  in Langflow's ``UnmaskedApiKeyRead`` shape (no ``created_at``, status 200 as FastAPI's).
- ``DELETE .../{api_key_id}``: revokes one of the caller's own keys;
  ``{"detail": "API Key deleted"}``.

The path is served with and without its trailing slash: Langflow's clients send the slash,
and FastAPI would only redirect the other form. Errors are FastAPI's ``{"detail": ...}``
(a list of problems for 422, as FastAPI's request validation gives).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from gateway.bodies import NotJson, parse_json, read_capped
from gateway.dialects.base import VIEW, Call, DialectSpec, Endpoint, json_response
from gateway.dialects.listing import all_keys
from gateway.policies import allowance
from gateway.policies.scopes import ORG_ADMIN, grants, is_privileged
from gateway.store.input import MAX_NAME
from gateway.store.record import KeyRecord, rfc3339

CREATE = "apikeys:create"
MAX_BODY = 1024 * 1024  # aiohttp's default client_max_size, which applied before
DELETE = "apikeys:delete"
_NOT_FOUND = "API Key not found"  # Langflow's words for a missing or another user's key
# Langflow's own texts for the refusals mount.py makes, where they exist.
_DETAIL = {
    "missing_key": "An API key must be passed as query or header",
    "invalid_key": "Invalid or missing API key",
    "method_not_allowed": "Method Not Allowed",
}


def key_json(record: KeyRecord, now_ms: int) -> dict[str, Any]:
    """Langflow's ``ApiKeyRead``: ``api_key`` is the masked label, never the secret."""
    return {
        "name": record.name,
        "last_used_at": rfc3339(record.last_used_at),
        "total_uses": record.total_uses,
        # Langflow keys have no expiry; an expired key here is as unusable as a disabled one.
        "is_active": record.status(now_ms) == "active",
        "id": record.id,
        "api_key": record.label,
        "user_id": record.user_id,
        "created_at": rfc3339(record.created_at),
    }


async def list_keys(call: Call) -> web.Response:
    caller = call.caller
    records = await all_keys(call.store, caller.workspace_id, user_id=caller.user_id)
    return json_response(
        {
            "total_count": len(records),
            "user_id": caller.user_id,
            "api_keys": [key_json(r, call.now_ms) for r in records],
        }
    )


def minted_scopes(held: tuple[str, ...]) -> tuple[str, ...]:
    """The scopes a key created through this endpoint gets: the caller's data-plane scopes.

    Privileged ones (``*``, ``apikeys:*``, ``org:*``) are dropped, so a key can never mint
    a key as powerful as itself, and a leaked key cannot plant siblings that mint more.
    """
    return tuple(scope for scope in held if not is_privileged(scope))


def minted_values(caller: KeyRecord, name: str | None) -> dict[str, Any]:
    """A new key of the caller's user, never looser than the caller: the same workspace,
    resources, expiry, spending limits, rate limit and max_in_flight (None values are left
    unset). ``create_key`` then bounds the caps by what the caller has left."""
    return {
        "name": name,
        "user_id": caller.user_id,
        "workspace_id": caller.workspace_id,
        "team_name": caller.team_name,
        "type": "PERSONAL",  # a Langflow key belongs to one user
        "scopes": minted_scopes(caller.scopes),
        "resources": caller.resources,
        "expires_at": caller.expires_at,
        "limit_micro": caller.limit_micro,
        "limit_reset": caller.limit_reset,
        "include_byok_in_limit": caller.include_byok_in_limit,
        "spend_caps": caller.spend_caps,
        "rate_limit": caller.rate_limit,
        "max_in_flight": caller.max_in_flight,
        "metadata": {"created_via": "langflow", "created_by_key": caller.id},
    }


async def _bounded(call: Call, values: dict[str, Any]) -> dict[str, Any] | web.Response:
    """``values`` with caps within the caller's remaining allowance (docs/dialects.md):
    Langflow's body asks for no caps, so the key gets, instead of the caller's caps whole,
    what the caller has left in each period it caps. An exempt caller (``apikeys:*``)
    hands on its own caps as they are."""
    room = await allowance.of_creator(call.store, call.caller)
    if room is None:  # revoked since it was authenticated
        return error(401, "invalid_key", "Invalid or missing API key")
    if not room.remaining_micro:
        return values
    found = allowance.bound(room, {})
    if isinstance(found, list):  # not for a request without caps; answered all the same
        return error(403, "forbidden", found[0].detail)
    uncapped = {name: value for name, value in values.items() if name not in allowance.CAP_FIELDS}
    return {**uncapped, **found}


async def create_key(call: Call) -> web.Response:
    # Read like every body keygate parses: capped, and a client that leaves is ClientLeft.
    raw = await read_capped(call.request.content, MAX_BODY)
    if raw is None:
        return error(413, "payload_too_large", "Request Entity Too Large")
    try:
        # Refused too: a lone surrogate (no text to store) and deep nesting, before any write.
        body = parse_json(raw) if raw else None
    except NotJson as exc:
        return _unprocessable("json_invalid", ["body", 0], "JSON decode error", {}, str(exc))
    if body is None:
        return _unprocessable("missing", ["body"], "Field required", None)
    if not isinstance(body, dict):
        message = "Input should be a valid dictionary or object to extract fields from"
        return _unprocessable("model_attributes_type", ["body"], message, body)
    # Langflow's ApiKeyCreate takes more fields (api_key, user_id, ...) but uses only name:
    # the secret is generated and the owner is the caller.
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        return _unprocessable(
            "string_type", ["body", "name"], "Input should be a valid string", name
        )
    if name is not None and len(name) > MAX_NAME:
        message = f"String should have at most {MAX_NAME} characters"
        return _unprocessable("string_too_long", ["body", "name"], message, name)
    values = await _bounded(call, minted_values(call.caller, name))
    if isinstance(values, web.Response):
        return values
    issued = await call.store.create(values)
    unmasked = key_json(issued.record, call.now_ms)
    del unmasked["created_at"]  # UnmaskedApiKeyRead has none
    unmasked["api_key"] = issued.secret  # shown once, as Langflow does
    return json_response(unmasked)


async def delete_key(call: Call) -> web.Response:
    raw_id = call.params["api_key_id"]
    try:
        key_id = str(uuid.UUID(raw_id))
    except ValueError:
        message = "Input should be a valid UUID"
        return _unprocessable("uuid_parsing", ["path", "api_key_id"], message, raw_id)
    caller = call.caller
    target = await call.store.get(key_id, caller.workspace_id)
    # Another user's key, or another workspace's, is answered like a missing one, so their
    # ids cannot be probed; 400, not 404, because Langflow's route answers every failed
    # delete with 400 and its clients expect that.
    if target is None or target.user_id != caller.user_id:
        return error(400, "not_found", _NOT_FOUND)
    held = (*caller.scopes, "apikeys:*") if grants(caller.scopes, ORG_ADMIN) else caller.scopes
    beyond = [s for s in target.scopes if is_privileged(s) and not grants(held, s)]
    if beyond:  # the admin API's rule: no key takes down a key more powerful than itself
        message = f"cannot delete a key holding {', '.join(beyond)}, which the caller lacks"
        return error(403, "forbidden", message)
    if not await call.store.revoke(key_id, caller.workspace_id):
        return error(400, "not_found", _NOT_FOUND)
    return json_response({"detail": "API Key deleted"})


def _unprocessable(
    kind: str, loc: list[str | int], message: str, given: object, reason: str | None = None
) -> web.Response:
    """FastAPI's 422 for a request its models reject."""
    problem: dict[str, Any] = {"type": kind, "loc": loc, "msg": message, "input": given}
    if reason is not None:
        problem["ctx"] = {"error": reason}
    return web.json_response({"detail": [problem]}, status=422)


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"detail": _DETAIL.get(code, message)}, status=status)


def endpoints(path: str) -> tuple[Endpoint, ...]:
    base = path.rstrip("/")
    found: list[Endpoint] = []
    for listing in dict.fromkeys((f"{base}/", base or "/")):
        found += [
            Endpoint("GET", listing, VIEW, list_keys),
            Endpoint("POST", listing, CREATE, create_key),
        ]
    found.append(Endpoint("DELETE", f"{base}/{{api_key_id}}", DELETE, delete_key))
    return tuple(found)


SPEC = DialectSpec(
    name="langflow",
    default_path="/api/v1/api_key/",
    sources=("x-api-key", "bearer"),
    endpoints=endpoints,
    error=error,
)
