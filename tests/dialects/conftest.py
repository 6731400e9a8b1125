"""Dialect tests run a real gateway (the proxy listener) against the session's Redis.

Dialects are opt-in (each manages keys on the public listener), so the gateway these tests
start enables every dialect, as ``dialects: {<name>: {enabled: true}}`` in a config would;
a test's own ``dialects=`` settings go on top (``{"konpro": {"enabled": False}}``).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config.model import DIALECTS
from tests.proxy.conftest import (  # noqa: F401  (fixtures shared with the proxy tests)
    Gateway,
    StartGateway,
    gateway,
    http,
    upstream,
)
from tests.proxy.conftest import start_gateway as proxy_gateway  # noqa: F401


@pytest.fixture
def start_gateway(proxy_gateway: StartGateway) -> StartGateway:  # noqa: F811
    async def start(*, dialects: dict[str, Any] | None = None, **sections: Any) -> Gateway:
        enabled = {name: {"enabled": True} for name in DIALECTS}
        for name, spec in (dialects or {}).items():
            enabled[name] = {"enabled": True, **spec}
        return await proxy_gateway(dialects=enabled, **sections)

    return start
