"""How a proxied request flows: the chain of steps, in order, written once
(docs/architecture.md)."""

from __future__ import annotations

from aiohttp import web

from gateway import listener
from gateway.config.model import Settings
from gateway.proxy import llm, steps, workspace
from gateway.proxy.authorize import KeyAuthorizer
from gateway.proxy.live import LiveProxy
from gateway.proxy.service import Proxy
from gateway.proxy.steps import Step
from gateway.store.clock import ClockOverride, server_clock
from gateway.store.cluster_multiplex import Multiplexer
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames

PROXY_CHAIN: tuple[Step, ...] = (
    steps.match_route,  # 400 bad path, 404 no route, 405 method
    steps.take_credential,  # 401 missing or bad checksum, 400 two different keys
    # On an LLM route: the JSON body read (400 naming a field, 413), its model priced
    # (403 unpriced_model), its own reservation worked out (reserve: auto)
    llm.read_llm_request,
    # ONE Redis call decides: 401 unknown/expired, 403 disabled, insufficient_scope or
    # resource not allowed (a JSON body is read only for a restricted key), 429 rate
    # limited, 402 spending cap reached, 503 store down; and reserves the expected cost
    steps.authorize_key,
    workspace.reserve_workspace,  # 402 workspace.spend_caps[i]: the same reserve, its budget
)
# then proxy.forward: stream to the upstream and back (502, 504), then settle the cost


def build_proxy(
    settings: Settings,
    redis: Multiplexer,
    clock: ClockOverride = server_clock,
    store: KeyStore | None = None,
) -> Proxy:
    """The proxy with its chain, authorizing keys over ``redis``; ``clock`` is for tests of
    period rollover (the scripts use the Redis server's TIME otherwise); ``store`` serves
    the listing dialects."""
    authorizer = KeyAuthorizer(
        redis,
        KeyNames(settings.redis.key_prefix),
        settings.keys.hash_cache_size,
        settings.keys.secret_prefix,
        clock,
    )
    return Proxy(settings, authorizer, PROXY_CHAIN, store)


def proxy_server(proxy: Proxy | LiveProxy) -> web.Server:
    """The low-level server: no router or middleware layers on the hot path, and the
    handler is cancelled when the client disconnects, which drops the upstream request.
    Its connections carry the client limits (gateway/listener.py); `keygate serve` and the
    tests both build the proxy listener here."""
    return listener.proxy_server(proxy.handle, proxy.settings, proxy.metrics)
