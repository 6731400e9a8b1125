"""``GET /metrics``: the Prometheus exposition (gateway/metrics.py), for scrapers.

On the admin listener it needs no key, as a scrape target on a private port usually does;
the admin listener should not be reachable from outside (DESIGN §2).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.metrics import Metrics

_METRICS = web.AppKey("metrics", Metrics)


async def metrics_text(request: web.Request) -> web.Response:
    body = request.app[_METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics(app: web.Application, metrics: Metrics) -> None:
    """Serve ``metrics`` at GET /metrics on ``app`` (before the app starts)."""
    app[_METRICS] = metrics
    app.router.add_get("/metrics", metrics_text)
