"""Liveness and readiness on the admin listener: /healthz and /readyz, no auth.

/healthz answers from the process alone. /readyz asks Redis one question, SCRIPT EXISTS for
the store's scripts, which also proves Redis answers the admin side's client; and, when the
process runs the proxy, a PING over the proxy's own connections (its multiplexer), since
the two clients can disagree (a sentinel that hangs, a node only one of them reaches). Both
go at once, bounded together by ``redis.socket_timeout``. A 503 names its reason in a fixed
phrase, never an exception's text (which can carry a URL and its password); the log says
why in words, once when Redis starts failing and once when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from gateway.store.availability import availability_of
from gateway.store.connection import STORE_ERRORS, describe
from gateway.store.keystore import KeyStore

from .context import SETTINGS, STORE

log = logging.getLogger("keygate.admin")

REDIS_UNREACHABLE = "redis unreachable"
SCRIPTS_NOT_LOADED = "scripts not loaded"

T = TypeVar("T")
# Asks Redis over the proxy's own path (raises a store error when it cannot).
Readiness = Callable[[], Awaitable[object]]


async def _no_proxy() -> None:
    return None


READINESS: web.AppKey[Readiness] = web.AppKey("readiness")


class _Unreachable(Exception):
    """Which client could not reach Redis (for the log line), and why."""

    def __init__(self, side: str, error: BaseException) -> None:
        super().__init__(side)
        self.side = side
        self.error = error


async def _asked(side: str, call: Awaitable[T]) -> T:
    try:
        return await call
    except (*STORE_ERRORS, TimeoutError) as exc:
        raise _Unreachable(side, exc) from exc


@dataclass(slots=True)
class ScriptReload:
    """At most one background SCRIPT LOAD at a time.

    A flushed script cache (a Redis restart without persistence) would otherwise keep the
    gateway unready for good: an orchestrator sends no traffic to an unready replica, and
    only traffic reloads scripts (EVALSHA, then SCRIPT LOAD on NOSCRIPT).
    """

    task: asyncio.Task[None] | None = field(default=None)

    def start(self, store: KeyStore, timeout: float) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(_reload(store, timeout))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


RELOAD = web.AppKey("script_reload", ScriptReload)


async def _reload(store: KeyStore, per_call: float) -> None:
    try:
        async with asyncio.timeout(per_call * len(store.scripts.__slots__)):
            await store.scripts.load()
    except (*STORE_ERRORS, TimeoutError) as exc:
        log.warning("reloading the store's scripts failed: %s", describe(exc))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when Redis answers both the admin side's client and the proxy's, and holds
    every store script; else 503 with the reason."""
    store = request.app[STORE]
    timeout = request.app[SETTINGS].redis.socket_timeout
    shas = [getattr(store.scripts, name).sha for name in store.scripts.__slots__]
    try:
        async with asyncio.timeout(timeout):
            loaded, _ = await asyncio.gather(
                _asked("admin", store.client.script_exists(*shas)),
                _asked("proxy", request.app[READINESS]()),
            )
    except (_Unreachable, TimeoutError) as exc:
        side, error = (exc.side, exc.error) if isinstance(exc, _Unreachable) else ("", exc)
        words = describe(error, request.app[SETTINGS].redis)
        client = f" ({side} client)" if side else ""
        # Once when Redis starts failing (or at startup, by the store), not per probe.
        availability_of(store).failed(f"readiness: key store unavailable{client}: {words}")
        return _unavailable(REDIS_UNREACHABLE)
    if not all(loaded):
        request.app[RELOAD].start(store, timeout)
        return _unavailable(SCRIPTS_NOT_LOADED)
    availability_of(store).answered("readiness: key store answers again; ready")
    return web.json_response({"status": "ready"})


def _unavailable(reason: str) -> web.Response:
    return web.json_response(
        {"status": "unavailable", "reason": reason}, status=503, headers={"Retry-After": "1"}
    )


async def _reload_context(app: web.Application) -> AsyncIterator[None]:
    app[RELOAD] = ScriptReload()
    yield
    await app[RELOAD].stop()


def add_routes(app: web.Application, readiness: Readiness | None = None) -> None:
    """/healthz and /readyz; ``readiness`` asks Redis over the proxy's own path."""
    app[READINESS] = readiness or _no_proxy
    app.cleanup_ctx.append(_reload_context)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)


def _status_schema(*statuses: str, reason: bool = False) -> dict[str, Any]:
    properties: dict[str, Any] = {"status": {"type": "string", "enum": list(statuses)}}
    if reason:
        properties["reason"] = {"type": "string", "enum": [REDIS_UNREACHABLE, SCRIPTS_NOT_LOADED]}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(properties),
        "properties": properties,
    }


def _probe(operation: str, summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": operation, "summary": summary, "security": [], **ok}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# OpenAPI path items, merged into the admin document where the routes are registered.
OPENAPI_PATHS: dict[str, Any] = {
    "/healthz": _probe(
        "getLiveness",
        "The process is alive (no Redis call)",
        {"responses": {"200": _json("Alive.", _status_schema("ok"))}},
    ),
    "/readyz": _probe(
        "getReadiness",
        "Redis answers and holds the store's scripts",
        {
            "responses": {
                "200": _json("Ready.", _status_schema("ready")),
                "503": _json(
                    "Not ready; `reason` says why.", _status_schema("unavailable", reason=True)
                ),
            }
        },
    ),
}
