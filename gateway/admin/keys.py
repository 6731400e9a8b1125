"""Native management API (docs/management-api.md): /v1/keys on the admin listener."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from aiohttp import web

from gateway.errors import Outcome, invalid, problem
from gateway.policies import allowance
from gateway.store import input as key_input
from gateway.store.keystore import BadCursor, Issued, KeyExists, KeyStore
from gateway.store.record import KeyRecord, from_micro
from gateway.usage import history

from .body import read_object
from .caller import Caller, Denied, authorize
from .context import SETTINGS, STORE

MAX_PAGE = 1000
MAX_GRACE_SECONDS = 30 * 86_400


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parse(
    body: dict[str, Any], mode: key_input.Mode, secret_prefix: str | None = None
) -> dict[str, Any]:
    try:
        return key_input.parse(body, mode, _now_ms(), secret_prefix=secret_prefix)
    except key_input.InvalidInput as exc:
        raise Denied(invalid(exc.errors)) from None


def _key_id(request: web.Request) -> str:
    """The path id; anything that is not a UUID cannot name a key (404, like a miss)."""
    raw = request.match_info["key_id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise Denied(_not_found()) from None


def _not_found() -> web.Response:
    # The same answer for "no such key" and "a key in a workspace you cannot see", so ids
    # of other workspaces cannot be probed.
    return problem(Outcome.NOT_FOUND, "no API key with this id")


async def _render(
    request: web.Request, record: KeyRecord, caller: Caller, secret: str | None = None
) -> dict[str, Any]:
    """The record with its derived usage fields (a report read after the change), and the
    secret when one was just issued. Raises Denied (404) if the key vanished meanwhile."""
    store = request.app[STORE]
    _, report = await store.report(record.id, caller.visible_workspace)
    if report is None:
        raise Denied(_not_found())
    body = await _with_in_flight(store, report.to_json())
    if secret is not None:
        body["key"] = secret
    return body


async def _create(request: web.Request, mode: key_input.Mode) -> web.Response:
    caller = await authorize(request, "apikeys:create")
    prefix = request.app[SETTINGS].keys.secret_prefix
    values = _parse(await read_object(request), mode, prefix)
    values.setdefault("workspace_id", caller.record.workspace_id)
    values.setdefault("user_id", caller.record.user_id)
    caller.require_workspace(values["workspace_id"])
    caller.require_grantable(values.get("scopes", ()))
    values.update(await _within_allowance(request, caller, values))
    secret, sha256 = values.pop("key", None), values.pop("sha256", None)
    try:
        issued: Issued = await request.app[STORE].create(values, secret=secret, sha256=sha256)
    except KeyExists:
        return problem(Outcome.CONFLICT, "a key with this secret already exists")
    return web.json_response(
        await _render(request, issued.record, caller, issued.secret),
        status=201,
        headers={"Location": f"/v1/keys/{issued.record.id}"},
    )


async def create_key(request: web.Request) -> web.Response:
    return await _create(request, "create")


async def import_key(request: web.Request) -> web.Response:
    return await _create(request, "import")


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise Denied(invalid([(name, "must be true or false")]))
    return raw in ("true", "1")


async def list_keys(request: web.Request) -> web.Response:
    caller = await authorize(request, "apikeys:view")
    query = request.query
    credential = request.app[SETTINGS].keys.query_param  # when keys arrive as ?api_key=
    unknown = set(query) - {
        "workspace_id",
        "user_id",
        "include_disabled",
        "limit",
        "cursor",
        credential,
    }
    if unknown:
        raise Denied(invalid([(name, "unknown query parameter") for name in sorted(unknown)]))
    workspace = query.get("workspace_id")
    if workspace is not None:
        caller.require_workspace(workspace)
    else:
        workspace = caller.visible_workspace
    user_id = query.get("user_id")
    if user_id is not None:
        try:
            user_id = str(uuid.UUID(user_id))
        except ValueError:
            raise Denied(invalid([("user_id", "must be a UUID")])) from None
    raw_limit = query.get("limit", "100")
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise Denied(invalid([("limit", f"must be an integer from 1 to {MAX_PAGE}")]))
    try:
        page = await request.app[STORE].list(
            workspace_id=workspace,
            user_id=user_id,
            include_disabled=_flag(request, "include_disabled"),
            limit=int(raw_limit),
            cursor=query.get("cursor"),
        )
    except BadCursor as exc:
        raise Denied(invalid([("cursor", str(exc))])) from None
    # One pipelined round trip for the page's usage; a key revoked since is left out.
    reports = await request.app[STORE].reports([r.id for r in page.records])
    data = [reports[r.id].to_json() for r in page.records if r.id in reports]
    return web.json_response({"data": data, "next_cursor": page.next_cursor})


async def get_key(request: web.Request) -> web.Response:
    caller = await authorize(request, "apikeys:view")
    store = request.app[STORE]
    _, report = await store.report(_key_id(request), caller.visible_workspace)
    if report is None:
        return _not_found()
    return web.json_response(await _with_in_flight(store, report.to_json()))


async def _with_in_flight(store: KeyStore, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (one key's view) with the reservation ledger's requests in flight: one
    HVALS, so only in single-key answers, never in listings."""
    in_flight, reserved = await store.reservations(body["id"])
    body["in_flight"], body["reserved"] = in_flight, from_micro(reserved)
    return body


async def get_usage(request: web.Request) -> web.Response:
    """Usage per day (90), ISO week (26) and month (24), oldest first, for charts."""
    caller = await authorize(request, "apikeys:view")
    key_id = _key_id(request)
    store = request.app[STORE]
    if await store.get(key_id, caller.visible_workspace) is None:
        return _not_found()
    # The Redis server's clock, as the scripts that write the buckets use (a test's fixed
    # clock when one is set), so the current bucket here is the one being written.
    override = store.clock()
    now_ms = int(override) if override else await store.server_time_ms()
    found = await history.read(store.client, store.names, key_id, now_ms)
    return web.json_response(found.to_json())


async def _within_allowance(
    request: web.Request, caller: Caller, values: dict[str, Any], held: KeyRecord | None = None
) -> dict[str, Any]:
    """The cap fields to write for a key the caller creates (``held`` None) or edits
    (``held``): ``values``' own, checked against the caller's remaining allowance, plus
    those it inherits (gateway/policies/allowance.py). Raises Denied for a looser cap.

    403, not 400: the request is valid, and a caller with more allowance left (or with
    apikeys:*) would get it; like "cannot grant" for scopes, it is about what this caller
    may hand out, so it is answered as ``require_grantable`` answers.
    """
    if allowance.exempt(caller.scopes):  # org:admin included (Caller.scopes adds apikeys:*)
        return {}
    room = await allowance.of_creator(request.app[STORE], caller.record)
    if room is None:  # revoked since it was authenticated
        raise Denied(problem(Outcome.INVALID_KEY, "the API key is not valid"))
    found = allowance.bound(room, values, held)
    if isinstance(found, dict):
        return found
    raise Denied(
        problem(
            Outcome.FORBIDDEN,
            found[0].detail,
            errors=[{"field": r.field, "detail": r.detail} for r in found],
            extra={
                "allowance": {
                    period: from_micro(micro) for period, micro in room.remaining_micro.items()
                }
            },
        )
    )


async def _managed(request: web.Request, caller: Caller) -> KeyRecord:
    """The path's key, if the caller sees that key and holds every scope it has.

    Without the second rule a key with ``apikeys:update`` could rotate an admin key of its
    workspace and receive that key's new secret.
    """
    target = await request.app[STORE].get(_key_id(request), caller.visible_workspace)
    if target is None:
        raise Denied(_not_found())
    caller.require_grantable(target.scopes)
    return target


async def _manageable(request: web.Request, caller: Caller) -> str:
    """The path's key id, under ``_managed``'s rules."""
    return (await _managed(request, caller)).id


async def update_key(request: web.Request) -> web.Response:
    caller = await authorize(request, "apikeys:update")
    values = _parse(await read_object(request), "update")
    target = await _managed(request, caller)
    if values.get("scopes"):
        caller.require_grantable(values["scopes"])
    if allowance.CAP_FIELDS.intersection(values):
        # The caller is the creator here: raising a key's cap (its own included) is
        # minting new allowance, held to the same bound as creating the key.
        values.update(await _within_allowance(request, caller, values, target))
    record = await request.app[STORE].update(target.id, values, caller.visible_workspace)
    if record is None:
        return _not_found()
    return web.json_response(await _render(request, record, caller))


async def revoke_key(request: web.Request) -> web.Response:
    caller = await authorize(request, "apikeys:delete")
    key_id = await _manageable(request, caller)
    if not await request.app[STORE].revoke(key_id, caller.visible_workspace):
        return _not_found()
    return web.Response(status=204)


async def rotate_key(request: web.Request) -> web.Response:
    caller = await authorize(request, "apikeys:update")
    body = await read_object(request, optional=True)
    unknown = set(body) - {"grace_seconds"}
    if unknown:
        raise Denied(invalid([(name, "unknown field") for name in sorted(unknown)]))
    grace = body.get("grace_seconds", 0)
    if (
        isinstance(grace, bool)
        or not isinstance(grace, int | float)
        or not math.isfinite(grace)
        or not 0 <= grace <= MAX_GRACE_SECONDS
    ):
        raise Denied(
            invalid([("grace_seconds", f"must be a number from 0 to {MAX_GRACE_SECONDS}")])
        )
    key_id = await _manageable(request, caller)
    issued = await request.app[STORE].rotate(key_id, float(grace), caller.visible_workspace)
    if issued is None:
        return _not_found()
    return web.json_response(await _render(request, issued.record, caller, issued.secret))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/keys", create_key)
    app.router.add_post("/v1/keys/import", import_key)
    app.router.add_get("/v1/keys", list_keys, allow_head=False)
    app.router.add_get("/v1/keys/{key_id}", get_key, allow_head=False)
    app.router.add_patch("/v1/keys/{key_id}", update_key)
    app.router.add_delete("/v1/keys/{key_id}", revoke_key)
    app.router.add_post("/v1/keys/{key_id}/rotate", rotate_key)
    app.router.add_get("/v1/keys/{key_id}/usage", get_usage, allow_head=False)
