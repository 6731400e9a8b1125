"""The auth listener's server (``auth_listen``): the client limits every listener has, and
the forward-auth handler on the serving proxy generation."""

from __future__ import annotations

from gateway import listener
from gateway.forward_auth.service import ForwardAuth
from gateway.proxy.live import LiveProxy


def auth_server(live: LiveProxy) -> listener.GuardedServer:
    """A server for the auth listener; a reload swaps the proxy generation it uses."""
    return listener.auth_server(
        ForwardAuth(lambda: live.current).handle, live.settings, live.metrics
    )
