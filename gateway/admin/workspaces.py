"""Workspace budgets on the admin listener (docs/management-api.md):
``PUT /v1/workspaces/{workspace_id}`` sets the spend caps that hold across all of a
workspace's keys (org:admin only: a workspace's own key must not raise its budget);
``GET`` shows them with their usage, for org:admin or a key of that workspace with
apikeys:view."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import invalid
from gateway.policies.scopes import ORG_ADMIN
from gateway.store.input import MAX_MONEY, WORKSPACE_PATTERN, InvalidInput
from gateway.store.workspaces import CAP_PERIODS, MAX_CAPS, USAGE_PERIODS, parse_budget
from gateway.store.workspaces import valid_workspace_id as _valid

from .body import read_object
from .caller import Denied, authorize
from .context import STORE

PATH = "/v1/workspaces/{workspace_id}"


def _workspace_id(request: web.Request) -> str:
    workspace_id = request.match_info["workspace_id"]
    if not _valid(workspace_id):
        raise Denied(invalid([("workspace_id", f"must match {WORKSPACE_PATTERN}")]))
    return workspace_id


async def put_budget(request: web.Request) -> web.Response:
    """Replace the workspace's caps (an empty list removes them); the budget after."""
    await authorize(request, ORG_ADMIN)
    workspace_id = _workspace_id(request)
    try:
        caps = parse_budget(await read_object(request))
    except InvalidInput as exc:
        raise Denied(invalid(exc.errors)) from None
    workspaces = request.app[STORE].workspaces
    await workspaces.set_caps(workspace_id, caps)
    return web.json_response((await workspaces.get(workspace_id)).to_json())


async def get_budget(request: web.Request) -> web.Response:
    caller = await authorize(request, "apikeys:view")
    workspace_id = _workspace_id(request)
    caller.require_workspace(workspace_id)  # another workspace: org:admin only (403)
    budget = await request.app[STORE].workspaces.get(workspace_id)
    return web.json_response(budget.to_json())


def add_routes(app: web.Application) -> None:
    app.router.add_put(PATH, put_budget)
    app.router.add_get(PATH, get_budget, allow_head=False)


# --- OpenAPI ---------------------------------------------------------------------------------

_CREDITS = {"type": "number", "description": "Credits (1 credit = 1,000,000 micro-units)."}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_BUDGET = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "workspace_id",
        "spend_caps",
        "usage",
        "in_flight",
        "reserved",
        "usage_by_model",
        "updated_at",
        "now",
    ],
    "properties": {
        "workspace_id": {"type": "string"},
        "spend_caps": {
            "type": "array",
            "description": "Every cap with the workspace's spend that counts against it now.",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "amount", "period", "used", "remaining", "resets_at"],
                "properties": {
                    "name": {"type": "string", "examples": ["workspace.spend_caps[0]"]},
                    "amount": _CREDITS,
                    "period": {"type": "string", "enum": list(CAP_PERIODS)},
                    "used": _CREDITS,
                    "remaining": {**_CREDITS, "minimum": 0},
                    "resets_at": {**_TIME, "description": "null: never (total)."},
                },
            },
        },
        "usage": {
            "type": "object",
            "description": "Non-BYOK spend of the workspace's keys while it had a budget.",
            "additionalProperties": False,
            "required": list(USAGE_PERIODS),
            "properties": {period: _CREDITS for period in USAGE_PERIODS},
        },
        "in_flight": {"type": "integer", "minimum": 0},
        "reserved": _CREDITS,
        "usage_by_model": {
            "$ref": "#/components/schemas/UsageByModelNow",
            "description": "Per model, the workspace's keys' requests while it had a budget.",
        },
        "updated_at": {**_TIME, "description": "When the caps were last set; null: never."},
        "now": {"type": "string", "format": "date-time"},
    },
}
_PUT_BODY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["spend_caps"],
    "properties": {
        "spend_caps": {
            "type": "array",
            "maxItems": MAX_CAPS,
            "description": "All must hold; an empty list removes the budget.",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["amount", "period"],
                "properties": {
                    "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_MONEY},
                    "period": {"type": "string", "enum": list(CAP_PERIODS)},
                },
            },
        }
    },
}


def _problem(text: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


def _ok(text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": _BUDGET}}}


_COMMON = {
    "400": _problem("Invalid workspace id or body; the problem names the field."),
    "401": _problem("Missing, unknown, revoked or expired API key."),
    "503": _problem("Key store unavailable."),
}
OPENAPI_PATHS: dict[str, Any] = {
    PATH: {
        "parameters": [
            {
                "name": "workspace_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": WORKSPACE_PATTERN},
            }
        ],
        "put": {
            "operationId": "setWorkspaceBudget",
            "summary": "Set a workspace's spend caps (across all its keys)",
            "description": "Needs org:admin. Replaces the caps; every key of the workspace "
            "(existing and future) reserves against them too, and a request they refuse is "
            "402 naming workspace.spend_caps[i].",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _PUT_BODY}},
            },
            "responses": {
                "200": _ok("The workspace's budget after the change."),
                **_COMMON,
                "403": _problem("Key disabled or without org:admin."),
                "413": _problem("Body over the configured limit."),
                "415": _problem("Body is not application/json."),
            },
        },
        "get": {
            "operationId": "getWorkspaceBudget",
            "summary": "A workspace's spend caps, usage and requests in flight",
            "description": "Needs apikeys:view in that workspace, or org:admin.",
            "responses": {
                "200": _ok("The workspace's budget now."),
                **_COMMON,
                "403": _problem("Key disabled, scope missing, or another workspace."),
            },
        },
    }
}
