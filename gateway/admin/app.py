"""The admin listener's aiohttp application."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.bodies import ClientLeft
from gateway.config.model import Settings
from gateway.errors import Outcome, problem
from gateway.metrics import Metrics
from gateway.store.connection import STORE_ERRORS
from gateway.store.keystore import KeyStore

from . import health, keys, metrics_endpoint, reload, workspaces
from .caller import Denied
from .context import SETTINGS, STORE
from .openapi import OPENAPI, document, serve_document

log = logging.getLogger("keygate.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_OUTCOMES = {
    404: Outcome.NOT_FOUND,
    405: Outcome.METHOD_NOT_ALLOWED,
    413: Outcome.PAYLOAD_TOO_LARGE,
    415: Outcome.UNSUPPORTED_MEDIA_TYPE,
}


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as a problem body: no stack trace, no secret, ever."""
    try:
        return await handler(request)
    except Denied as denied:
        return denied.response
    except ClientLeft:  # mid-body: nobody to answer, and no store failed
        log.debug("client left during %s %s before sending its body", request.method, request.path)
        return problem(Outcome.INVALID_REQUEST, "the body ended before its announced length")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        outcome = _HTTP_OUTCOMES.get(exc.status, Outcome.INVALID_REQUEST)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem(outcome, exc.reason, headers=headers)
    except STORE_ERRORS as exc:
        log.warning(
            "key store error on %s %s: %s", request.method, request.path, type(exc).__name__
        )
        return problem(Outcome.STORE_ERROR, "the key store is unavailable; retry shortly")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(Outcome.INTERNAL_ERROR, "internal error; see the gateway log")


def build_admin_app(
    settings: Settings,
    store: KeyStore,
    metrics: Metrics | None = None,
    *,
    readiness: health.Readiness | None = None,
    reloader: reload.Reload | None = None,
) -> web.Application:
    """The admin application: management API, health probes, metrics (the proxy's, or
    an empty set when there is no proxy) and OpenAPI document. ``readiness`` (the proxy's
    multiplexer's ``ping``) makes /readyz ask Redis over the proxy's own path too;
    ``reloader`` serves POST /v1/admin/reload (a 409 without one)."""
    app = web.Application(middlewares=[problems], client_max_size=settings.admin.max_body_bytes)
    app[SETTINGS] = settings
    app[STORE] = store
    app[OPENAPI] = document()
    keys.add_routes(app)
    workspaces.add_routes(app)
    health.add_routes(app, readiness)
    reload.add_routes(app, reloader)
    metrics_endpoint.add_routes(app, metrics if metrics is not None else Metrics())
    app.router.add_get("/openapi.json", serve_document, allow_head=False)
    return app
