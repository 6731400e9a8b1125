"""``POST /v1/admin/reload``: reload the config without a signal, for operators who cannot
send SIGHUP (a container platform, a CI job). Needs a key holding ``org:admin``.

The reload is the SIGHUP one (gateway/proxy/live.py): a valid config switches new
requests to it, an invalid one changes nothing and comes back as a 409 problem with one
``errors`` entry per problem. Under ``--workers`` the worker that takes the call checks the
config, then has the supervisor tell every worker to reload (``status: "signalled"``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.config.reloadable import ReloadResult
from gateway.errors import Outcome, problem
from gateway.policies.scopes import ORG_ADMIN

from .caller import authorize

Reload = Callable[[], Awaitable[ReloadResult]]
RELOAD: web.AppKey[Reload | None] = web.AppKey("reload")
PATH = "/v1/admin/reload"


async def reload_config(request: web.Request) -> web.Response:
    await authorize(request, ORG_ADMIN)
    reload = request.app[RELOAD]
    if reload is None:
        return problem(Outcome.CONFLICT, "this process serves no proxy: there is nothing to reload")
    result = await reload()
    if not result.ok:
        return problem(
            Outcome.CONFLICT,
            "the config is invalid; the running config stays",
            errors=[_error(line) for line in result.problems],
        )
    return web.json_response(result.as_json())


def _error(line: str) -> dict[str, str]:
    """A config problem line (``field: what is wrong``) as a problem's ``errors`` entry."""
    where, sep, detail = line.partition(": ")
    return {"field": where, "detail": detail} if sep else {"field": "", "detail": line}


def add_routes(app: web.Application, reload: Reload | None) -> None:
    app[RELOAD] = reload
    app.router.add_post(PATH, reload_config)


def _problem(text: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


OPENAPI_PATHS: dict[str, Any] = {
    PATH: {
        "post": {
            "operationId": "reloadConfig",
            "summary": "Reload the config file (as SIGHUP does)",
            "description": "Needs org:admin. Routes, upstreams, dialects, key sources, cost "
            "rules and route limits switch for new requests; requests in flight finish on "
            "the old config. `restart_needed` lists changed options that only a restart "
            "applies (listeners, redis, workers, ...).",
            "responses": {
                "200": {
                    "description": "Reloaded (or, under --workers, every worker signalled).",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": [
                                    "status",
                                    "generation",
                                    "routes",
                                    "upstreams",
                                    "restart_needed",
                                ],
                                "properties": {
                                    "status": {"enum": ["reloaded", "signalled"]},
                                    "generation": {"type": "integer", "minimum": 1},
                                    "routes": {"type": "integer", "minimum": 0},
                                    "upstreams": {"type": "integer", "minimum": 0},
                                    "restart_needed": {
                                        "type": "array",
                                        "items": {"type": "string"},
                                    },
                                },
                            }
                        }
                    },
                },
                "401": _problem("Missing, unknown, revoked or expired API key."),
                "403": _problem("Key disabled or without org:admin."),
                "409": _problem("The config is invalid (the running one stays), or no proxy."),
                "503": _problem("Key store unavailable."),
            },
        }
    }
}
