"""``GET /metrics`` on the proxy listener (``metrics.on_proxy: true``), for keys holding
``metrics:read``: a scraper outside the private network reaches the metrics the way
Baseten's WORKSPACE_EXPORT_METRICS keys do, without the admin listener being exposed.

It is mounted like a listing dialect (gateway/dialects/mount.py authenticates the key and
checks the scope); refusals are RFC 9457 problems, as on the rest of the proxy.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.dialects.base import Call, DialectSpec, Endpoint
from gateway.errors import Outcome, problem
from gateway.metrics import Metrics

SCOPE = "metrics:read"
_OUTCOMES = {code.value: code for code in Outcome}


def metrics_on_proxy(metrics: Metrics) -> DialectSpec:
    async def serve(call: Call) -> web.Response:
        return web.Response(
            body=metrics.exposition(),
            headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"},
        )

    def endpoints(path: str) -> tuple[Endpoint, ...]:
        return (Endpoint("GET", path, SCOPE, serve),)

    return DialectSpec(
        name="metrics",
        default_path="/metrics",
        sources=("bearer", "x-api-key"),
        endpoints=endpoints,
        error=_error,
        route_label="metrics",
    )


def _error(status: int, code: str, message: str) -> web.Response:
    outcome = _OUTCOMES.get(code, Outcome.INVALID_REQUEST)
    return problem(outcome, message, scope=SCOPE if outcome is Outcome.FORBIDDEN_SCOPE else None)
