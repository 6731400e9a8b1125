"""Dialect tests run a real gateway (the proxy listener) against the session's Redis."""

from __future__ import annotations

from tests.proxy.conftest import (  # noqa: F401  (fixtures shared with the proxy tests)
    gateway,
    http,
    start_gateway,
    upstream,
)
