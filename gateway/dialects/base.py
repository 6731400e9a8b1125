"""What every listing dialect is made of (docs/dialects.md), and the one place that authenticates
its caller: a dialect module only turns canonical records into its service's JSON and its
errors into its service's error body.

A dialect is a ``DialectSpec``: its name, its default listing path, the credential sources
its real clients use, its endpoints (built from the configured listing path) and its error
body. ``gateway/dialects/mount.py`` mounts the enabled ones on the proxy listener.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.store.record import KeyRecord

if TYPE_CHECKING:
    from gateway.config.model import Settings
    from gateway.store.keystore import KeyStore

VIEW = "apikeys:view"  # every listing needs it (docs/dialects.md)


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated call to a dialect endpoint."""

    request: web.BaseRequest
    caller: KeyRecord  # the key that made the call (active, holding the endpoint's scope)
    now_ms: int  # the store's clock when the caller was authenticated
    store: KeyStore
    settings: Settings
    params: dict[str, str] = field(default_factory=dict)  # path segments named in {braces}


Handler = Callable[[Call], Awaitable[web.Response]]
# (status, code, message) -> the service's own error response
ErrorBody = Callable[[int, str, str], web.Response]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str  # absolute; a "{name}" segment matches one non-empty path segment
    scope: str  # the scope the caller needs
    handler: Handler


@dataclass(frozen=True, slots=True)
class DialectSpec:
    name: str
    default_path: str  # the listing path; config ``dialects.<name>.path`` overrides it
    sources: tuple[str, ...]  # credential sources its clients use (gateway/credentials.py)
    endpoints: Callable[[str], tuple[Endpoint, ...]]  # from the listing path in effect
    error: ErrorBody
    route_label: str = ""  # the metrics' route label; "" means dialect:<name>


def json_response(body: object, status: int = 200) -> web.Response:
    """A dialect's success (always JSON, never cached: it lists keys)."""
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})
