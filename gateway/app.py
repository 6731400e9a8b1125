"""How a proxied request flows: the chain of steps, in order, written once (STYLE.md)."""

from __future__ import annotations

from aiohttp import web

from gateway.config.model import Settings
from gateway.proxy import steps
from gateway.proxy.authorize import KeyAuthorizer
from gateway.proxy.service import Proxy
from gateway.proxy.steps import Step
from gateway.store.multiplex import RedisMultiplexer
from gateway.store.names import KeyNames

PROXY_CHAIN: tuple[Step, ...] = (
    steps.match_route,  # 400 bad path, 404 no route, 405 method
    steps.take_credential,  # 401 missing or bad checksum, 400 two different keys
    steps.authorize_key,  # 401 unknown/expired, 403 disabled, 503 store down: ONE Redis call
    steps.check_scopes,  # 403 insufficient_scope
    steps.check_resource,  # 403 resource not allowed (reads a JSON body only if restricted)
)
# then proxy.forward: stream to the upstream and back (502, 504)


def build_proxy(settings: Settings, redis: RedisMultiplexer) -> Proxy:
    """The proxy with its chain, authorizing keys over ``redis``."""
    authorizer = KeyAuthorizer(
        redis,
        KeyNames(settings.redis.key_prefix),
        settings.keys.hash_cache_size,
        settings.keys.secret_prefix,
    )
    return Proxy(settings, authorizer, PROXY_CHAIN)


def proxy_server(proxy: Proxy) -> web.Server:
    """The low-level server: no router or middleware layers on the hot path, and the
    handler is cancelled when the client disconnects, which drops the upstream request."""
    return web.Server(proxy.handle, handler_cancellation=True, access_log=None)
