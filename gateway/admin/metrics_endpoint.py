"""``GET /metrics``: the Prometheus exposition (gateway/metrics.py), for scrapers.

On the admin listener it needs no key, as a scrape target on a private port usually does;
the admin listener should not be reachable from outside (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.metrics import Metrics

_METRICS = web.AppKey("metrics", Metrics)


async def metrics_text(request: web.Request) -> web.Response:
    body = request.app[_METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application, metrics: Metrics) -> None:
    """Serve ``metrics`` at GET /metrics on ``app``."""
    app[_METRICS] = metrics
    app.router.add_get("/metrics", metrics_text, allow_head=False)


# The path item, merged into the admin OpenAPI document (gateway/admin/openapi.py).
OPENAPI_PATHS: dict[str, Any] = {
    "/metrics": {
        "get": {
            "operationId": "getMetrics",
            "summary": "Prometheus metrics (text exposition format)",
            "security": [],
            "responses": {
                "200": {
                    "description": "Every keygate metric; see gateway/metrics.py.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
}
