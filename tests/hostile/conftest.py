"""Peers that misbehave rather than die: raw-socket clients, malicious upstreams, Redis
servers that hang. The gateway, upstreams and helpers are the proxy tests' own
(tests/proxy/conftest.py), imported here so both suites drive the same real parts."""

from __future__ import annotations

from tests.proxy.conftest import (
    cost_gateway,
    cost_upstream_url,
    gateway,
    http,
    serve_app,
    serve_raw,
    start_cost_gateway,
    start_gateway,
    upstream,
)

__all__ = [
    "cost_gateway",
    "cost_upstream_url",
    "gateway",
    "http",
    "serve_app",
    "serve_raw",
    "start_cost_gateway",
    "start_gateway",
    "upstream",
]
