"""The OpenAPI 3.1 document of the admin listener, built from the same field specs that
validate requests, so the document and the behaviour cannot drift apart."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.store.input import fields_for
from gateway.store.record import KEY_TYPES, PERIODS
from gateway.store.report import MODEL_PERIODS, MODELS_PER_BUCKET, OTHER_MODEL
from gateway.usage.history import WINDOW

from .health import OPENAPI_PATHS as HEALTH_PATHS
from .keys import MAX_GRACE_SECONDS, MAX_PAGE
from .metrics_endpoint import OPENAPI_PATHS as METRICS_PATHS
from .reload import OPENAPI_PATHS as RELOAD_PATHS
from .workspaces import OPENAPI_PATHS as WORKSPACE_PATHS

_NULLABLE_STRING = {"type": ["string", "null"]}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_MONEY = {"type": "number", "minimum": 0}
_CREDITS = {"type": "number", "description": "Credits (1 credit = 1,000,000 micro-units)."}
_TIME = {"type": "string", "format": "date-time"}
# Usage per model (one bucket), and per model for the current day, week and month.
_MODELS = {"$ref": "#/components/schemas/UsageByModel"}
_MODEL_PERIODS = {"$ref": "#/components/schemas/UsageByModelNow"}


def _models_schema() -> dict[str, Any]:
    """The usage per model components (keys, their history, workspaces)."""
    usage = {
        "type": "object",
        "additionalProperties": False,
        "required": ["cost", "input_tokens", "output_tokens", "requests"],
        "properties": {
            "cost": {**_CREDITS, "description": "What its requests cost (actual cost)."},
            "input_tokens": {"type": "integer", "minimum": 0},
            "output_tokens": {"type": "integer", "minimum": 0},
            "requests": {"type": "integer", "minimum": 0},
        },
    }
    return {
        "UsageByModel": {
            "type": "object",
            "description": "Per model the response named: cost, tokens and requests of the "
            "requests settled with token usage (LLM routes), BYOK included, highest cost "
            f"first. At most {MODELS_PER_BUCKET} models per key (or workspace) and period; "
            f"the requests of any further model count under `{OTHER_MODEL}`.",
            "additionalProperties": usage,
            "examples": [
                {
                    "gpt-4o-mini": {
                        "cost": 0.0123,
                        "input_tokens": 1200,
                        "output_tokens": 300,
                        "requests": 4,
                    }
                }
            ],
        },
        "UsageByModelNow": {
            "type": "object",
            "description": "Usage per model in the current UTC day, ISO week and month.",
            "additionalProperties": False,
            "required": list(MODEL_PERIODS),
            "properties": {period: _MODELS for period in MODEL_PERIODS},
        },
    }


def _derived_schema() -> dict[str, Any]:
    """The usage fields a key record carries (docs/architecture.md), read when the response
    is made."""
    usage = {
        f"{kind}{suffix}": _CREDITS
        for kind in ("usage", "byok_usage")
        for suffix in ("", "_daily", "_weekly", "_monthly")
    }
    return {
        "limit_remaining": {
            "type": ["number", "null"],
            "minimum": 0,
            "description": "Room left under `limit` in its current period; null: no limit.",
        },
        **usage,
        "usage_resets_at": {
            "type": "object",
            "description": "When the current day, ISO week and month end (UTC).",
            "additionalProperties": False,
            "required": list(PERIODS),
            "properties": {period: _TIME for period in PERIODS},
        },
        "caps": {
            "type": "array",
            "description": "`limit` (when set) and every spend cap, with the spend that counts "
            "against it now.",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "amount", "period", "used", "remaining", "resets_at"],
                "properties": {
                    "name": {"type": "string", "examples": ["limit", "spend_caps[0]"]},
                    "amount": _MONEY,
                    "period": {"type": "string", "enum": [*PERIODS, "total"]},
                    "used": _CREDITS,
                    "remaining": _MONEY,
                    "resets_at": {**_NULLABLE_TIME, "description": "null: never (total)."},
                },
            },
        },
        "usage_by_model": _MODEL_PERIODS,
        "rate_limit_state": {
            "type": ["object", "null"],
            "description": "The key's own rate limit now; null when it has none.",
            "additionalProperties": False,
            "required": ["requests", "period_seconds", "remaining", "full_at"],
            "properties": {
                "requests": {"type": "integer", "minimum": 1},
                "period_seconds": {"type": "number", "exclusiveMinimum": 0},
                "remaining": {"type": "integer", "minimum": 0},
                "full_at": _TIME,
            },
        },
    }


def _usage_history_schema() -> dict[str, Any]:
    point = {
        "type": "object",
        "additionalProperties": False,
        "required": ["period", "start", "end", "usage", "byok_usage"],
        "properties": {
            "period": {
                "type": "string",
                "description": "The bucket: 2026-11-22, 2026-W47 (ISO week) or 2026-11.",
            },
            "start": _TIME,
            "end": {**_TIME, "description": "Exclusive: when the period resets."},
            "usage": _CREDITS,
            "byok_usage": _CREDITS,
            "models": {**_MODELS, "description": "Present when the period has any."},
        },
    }

    def series(count: int, text: str) -> dict[str, Any]:
        return {
            "type": "array",
            "minItems": count,
            "maxItems": count,
            "description": text,
            "items": {"$ref": "#/components/schemas/UsagePoint"},
        }

    return {
        "UsagePoint": point,
        "UsageHistory": {
            "type": "object",
            "additionalProperties": False,
            "required": ["key_id", "now", "daily", "weekly", "monthly"],
            "properties": {
                "key_id": {"type": "string", "format": "uuid"},
                "now": {**_TIME, "description": "The Redis server's clock."},
                "daily": series(WINDOW["daily"], "UTC days, oldest first, today last."),
                "weekly": series(
                    WINDOW["weekly"], "ISO weeks (from Monday), oldest first, this week last."
                ),
                "monthly": series(WINDOW["monthly"], "Months, oldest first, this month last."),
            },
        },
    }


def _input_schema(mode: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {spec.name: spec.json_schema() for spec in fields_for(mode)},
    }


def _key_schema(with_secret: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "id": {"type": "string", "format": "uuid"},
        "name": _NULLABLE_STRING,
        "prefix": {"type": "string", "description": "Leading characters of the secret."},
        "label": {"type": "string", "description": "Masked form, e.g. kg_7fK2...x9Qa."},
        "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "user_id": {"type": "string", "format": "uuid"},
        "workspace_id": {"type": "string"},
        "team_name": _NULLABLE_STRING,
        "type": {"type": "string", "enum": list(KEY_TYPES)},
        "scopes": {"type": "array", "items": {"type": "string"}},
        "resources": {"type": ["array", "null"], "items": {"type": "string"}},
        "disabled": {"type": "boolean"},
        "status": {"type": "string", "enum": ["active", "disabled", "expired"]},
        "expires_at": _NULLABLE_TIME,
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "last_used_at": _NULLABLE_TIME,
        "total_uses": {"type": "integer", "minimum": 0},
        "limit": {"type": ["number", "null"], "minimum": 0},
        "limit_reset": {"type": ["string", "null"], "enum": [*PERIODS, None]},
        "include_byok_in_limit": {"type": "boolean"},
        "spend_caps": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["amount", "period"],
                "additionalProperties": False,
                "properties": {
                    "amount": _MONEY,
                    "period": {"type": "string", "enum": [*PERIODS, "total"]},
                },
            },
        },
        "rate_limit": {
            "type": ["object", "null"],
            "required": ["requests", "period_seconds"],
            "additionalProperties": False,
            "properties": {
                "requests": {"type": "integer", "minimum": 1},
                "period_seconds": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "max_in_flight": {
            "type": ["integer", "null"],
            "minimum": 1,
            "description": "Requests in flight at once across replicas; null: no limit.",
        },
        "token_limits": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["tokens", "period_seconds"],
                "properties": {
                    "tokens": {"type": "integer", "minimum": 1},
                    "period_seconds": {"type": "number", "exclusiveMinimum": 0},
                },
            },
            "description": "LLM tokens (input plus output) per fixed window, on LLM routes.",
        },
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "imported": {"type": "boolean", "description": "Adopted from an existing secret or hash."},
        **_derived_schema(),
    }
    required = list(properties)
    if with_secret:
        properties["key"] = {"type": "string", "description": "The secret. Shown only here, once."}
        required.append("key")
    # The reservation ledger's requests in flight: in answers about one key, not in listings.
    properties["in_flight"] = {
        "type": "integer",
        "minimum": 0,
        "description": "Requests reserved and not settled yet, their lease not ended "
        "(answers about one key only, not listings).",
    }
    properties["reserved"] = {
        **_CREDITS,
        "description": "What those requests hold against the caps (answers about one key only).",
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


def _problem(status: int, text: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


_ERRORS = {
    "400": "Invalid input; the problem names the field.",
    "401": "Missing, unknown, revoked or expired API key.",
    "403": (
        "Key disabled, scope missing, another workspace, scopes beyond the caller's, or "
        "caps looser than the caller's remaining allowance (`allowance`: what is left per "
        "period)."
    ),
    "404": "No such key visible to the caller.",
    "409": "A key with this secret already exists.",
    "413": "Body over the configured limit.",
    "415": "Body is not application/json.",
    "503": "Key store unavailable.",
}


def _responses(ok: dict[str, Any], *statuses: str) -> dict[str, Any]:
    responses = dict(ok)
    for status in ("400", "401", "403", "503", *statuses):
        responses[status] = _problem(int(status), _ERRORS[status])
    return responses


def _json(ref: str, text: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _body(ref: str, required: bool = True) -> dict[str, Any]:
    return {
        "required": required,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


_KEY_ID = {
    "name": "key_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document as a JSON-ready dict."""
    import_schema = _input_schema("import")
    import_schema["oneOf"] = [
        {"required": ["key"], "not": {"required": ["sha256"]}},
        {"required": ["sha256"], "not": {"required": ["key"]}},
    ]
    update_schema = {**_input_schema("update"), "minProperties": 1}
    list_params = [
        {
            "name": "workspace_id",
            "in": "query",
            "schema": {"type": "string"},
            "description": "Another workspace than the caller's needs org:admin.",
        },
        {"name": "user_id", "in": "query", "schema": {"type": "string", "format": "uuid"}},
        {
            "name": "include_disabled",
            "in": "query",
            "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
        },
        {
            "name": "cursor",
            "in": "query",
            "schema": {"type": "string"},
            "description": "next_cursor of the previous page.",
        },
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keygate admin API",
            "version": __version__,
            "description": "Manage API keys. Every call needs a keygate key with the "
            "matching apikeys:* scope; org:admin sees every workspace.",
        },
        "security": [{"bearer": []}, {"apiKeyHeader": []}],
        "paths": {
            "/v1/keys": {
                "post": {
                    "operationId": "createKey",
                    "summary": "Create a key",
                    "requestBody": _body("KeyCreate"),
                    "responses": _responses(
                        {"201": _json("KeyWithSecret", "Created; `key` is the secret.")},
                        "413",
                        "415",
                    ),
                },
                "get": {
                    "operationId": "listKeys",
                    "summary": "List keys",
                    "parameters": list_params,
                    "responses": _responses({"200": _json("KeyList", "One page of keys.")}),
                },
            },
            "/v1/keys/import": {
                "post": {
                    "operationId": "importKey",
                    "summary": "Adopt an existing secret or sha256",
                    "requestBody": _body("KeyImport"),
                    "responses": _responses(
                        {"201": _json("Key", "Imported.")}, "409", "413", "415"
                    ),
                },
            },
            "/v1/keys/{key_id}": {
                "parameters": [_KEY_ID],
                "get": {
                    "operationId": "getKey",
                    "summary": "Show a key",
                    "responses": _responses({"200": _json("Key", "The key.")}, "404"),
                },
                "patch": {
                    "operationId": "updateKey",
                    "summary": "Change only the given fields",
                    "requestBody": _body("KeyUpdate"),
                    "responses": _responses(
                        {"200": _json("Key", "The key after the change.")}, "404", "413", "415"
                    ),
                },
                "delete": {
                    "operationId": "revokeKey",
                    "summary": "Revoke a key everywhere",
                    "responses": _responses({"204": {"description": "Revoked."}}, "404"),
                },
            },
            "/v1/keys/{key_id}/rotate": {
                "parameters": [_KEY_ID],
                "post": {
                    "operationId": "rotateKey",
                    "summary": "New secret, same id and usage",
                    "requestBody": _body("Rotate", required=False),
                    "responses": _responses(
                        {"200": _json("KeyWithSecret", "Rotated.")}, "404", "413", "415"
                    ),
                },
            },
            "/v1/keys/{key_id}/usage": {
                "parameters": [_KEY_ID],
                "get": {
                    "operationId": "getKeyUsage",
                    "summary": "Usage per day, ISO week and month, for charts",
                    "description": "Credits spent (and BYOK credits), and usage per model, "
                    f"in each of the last {WINDOW['daily']} UTC days, {WINDOW['weekly']} ISO "
                    f"weeks and {WINDOW['monthly']} months, oldest first, the current period "
                    "last; periods without usage are 0. At most "
                    f"{MODELS_PER_BUCKET} models per period, the rest under `{OTHER_MODEL}`. "
                    "Needs apikeys:view.",
                    "responses": _responses(
                        {"200": _json("UsageHistory", "The key's usage history.")}, "404"
                    ),
                },
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenApiDocument",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 document of this listener.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["openapi", "info", "paths"],
                                    }
                                }
                            },
                        }
                    },
                },
            },
            **HEALTH_PATHS,
            **RELOAD_PATHS,
            **WORKSPACE_PATHS,
            **METRICS_PATHS,
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
            "schemas": {
                "KeyCreate": _input_schema("create"),
                "KeyImport": import_schema,
                "KeyUpdate": update_schema,
                "Rotate": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "grace_seconds": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": MAX_GRACE_SECONDS,
                            "description": "How long the old secret keeps working.",
                        }
                    },
                },
                "Key": _key_schema(False),
                "KeyWithSecret": _key_schema(True),
                "KeyList": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["data", "next_cursor"],
                    "properties": {
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}},
                        "next_cursor": _NULLABLE_STRING,
                    },
                },
                **_usage_history_schema(),
                **_models_schema(),
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail", "code"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "code": {"type": "string"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["field", "detail"],
                                "properties": {
                                    "field": {"type": "string"},
                                    "detail": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    }


async def serve_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


OPENAPI = web.AppKey("openapi", dict)
