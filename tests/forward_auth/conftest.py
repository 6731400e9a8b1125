"""Fixtures for the forward-auth tests: keygate's auth listener in process, against the
session's real Redis, and the demo upstream the real proxies (nginx, Traefik, Caddy,
Envoy) forward to.

- ``upstream``: the demo upstream recording every request that reached it (as in the
  proxy tests): ``/echo/...`` answers with the headers it received.
- ``start_auth(routes=[...], **sections)``: an auth listener on a random loopback port,
  configured with those routes (each needs an ``upstream``: "demo" exists); every one
  started is stopped at teardown. ``gw.url``, ``gw.port``, ``gw.proxy``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.app import build_proxy
from gateway.config.load import build
from gateway.config.model import Settings
from gateway.forward_auth.wire import AuthListener
from gateway.proxy.live import LiveProxy
from gateway.proxy.service import Proxy
from gateway.store.cluster_multiplex import Multiplexer, multiplexer_for
from gateway.store.keystore import KeyStore
from tests.proxy.conftest import LOOPBACK, Upstream
from tests.proxy.conftest import http as http
from tests.proxy.conftest import upstream as upstream


@dataclass
class AuthGateway:
    proxy: Proxy
    settings: Settings
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


StartAuth = Callable[..., Awaitable[AuthGateway]]


@pytest.fixture
async def start_auth(
    redis_url: str, key_prefix: str, upstream: Upstream, tmp_path: Path, store: KeyStore
) -> AsyncIterator[StartAuth]:
    started: list[tuple[AuthListener, Proxy, Multiplexer]] = []

    async def start(*, routes: list[dict[str, Any]] | None = None, **sections: Any) -> AuthGateway:
        raw = {
            "redis": {
                "url": redis_url,
                "key_prefix": key_prefix,
                "connect_timeout": 1.0,
                "socket_timeout": 1.0,
            },
            "upstreams": {"demo": {"url": upstream.url}},
            "routes": routes or [],
            **sections,
        }
        settings = build(raw, tmp_path)
        mux = multiplexer_for(settings.redis, settings.redis.url)
        proxy = build_proxy(settings, mux, store=store)
        await proxy.start()
        listener = AuthListener(LiveProxy(proxy))
        sock = socket.socket()
        sock.bind((LOOPBACK, 0))
        sock.listen(128)
        await listener.start([sock])
        started.append((listener, proxy, mux))
        return AuthGateway(proxy, settings, sock.getsockname()[1])

    yield start
    for listener, proxy, mux in reversed(started):
        await listener.close(grace=0.5)
        await proxy.close()
        await mux.close()
