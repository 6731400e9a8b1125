"""The enabled dialects' endpoints on the proxy listener, and the authentication they share.

Matching costs the proxy's hot path one ``rpartition`` and at most two dict lookups: exact
paths, and paths whose last segment is a parameter (``/api/v1/keys/{hash}``) keyed by
their parent path.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.config.model import DIALECTS, Settings
from gateway.credentials import extract
from gateway.dialects.base import Call, DialectSpec, Endpoint
from gateway.errors import Outcome
from gateway.policies.scopes import grants
from gateway.proxy.routing import Match, Router
from gateway.store.connection import STORE_ERRORS

if TYPE_CHECKING:
    from gateway.store.keystore import KeyStore

log = logging.getLogger("keygate.dialects")
Found = tuple[DialectSpec, dict[str, Endpoint], dict[str, str]]  # endpoints by method


def registry() -> dict[str, DialectSpec]:
    """Every dialect keygate has, by name (each module under gateway/dialects/ has SPEC)."""
    return {name: importlib.import_module(f"gateway.dialects.{name}").SPEC for name in DIALECTS}


class DialectRouter:
    def __init__(self, settings: Settings, specs: Mapping[str, DialectSpec]) -> None:
        self._exact: dict[str, tuple[DialectSpec, dict[str, Endpoint]]] = {}
        self._by_parent: dict[str, tuple[DialectSpec, str, dict[str, Endpoint]]] = {}
        for name, spec in specs.items():
            configured = settings.dialects.get(name)
            if configured is not None and not configured.enabled:
                continue
            path = (configured.path if configured else None) or spec.default_path
            for endpoint in spec.endpoints(path):
                self._add(spec, endpoint)

    def _add(self, spec: DialectSpec, endpoint: Endpoint) -> None:
        parent, _, last = endpoint.path.rpartition("/")
        if last.startswith("{") and last.endswith("}"):
            _, _, methods = self._by_parent.setdefault(parent, (spec, last[1:-1], {}))
        else:
            _, methods = self._exact.setdefault(endpoint.path, (spec, {}))
        if endpoint.method in methods:
            raise ValueError(f"two dialect endpoints at {endpoint.method} {endpoint.path}")
        methods[endpoint.method] = endpoint

    def shadowed(self, router: Router) -> list[str]:
        """What the dialects take from configured routes: "METHOD /path (dialect, route)"
        for each endpoint a route would otherwise forward (dialects are matched first)."""
        found = []
        for path, (spec, methods) in self._exact.items():
            found += _shadowed(router, spec, path, methods)
        for parent, (spec, param, methods) in self._by_parent.items():
            found += _shadowed(router, spec, f"{parent}/{{{param}}}", methods)
        return found

    def __bool__(self) -> bool:
        return bool(self._exact or self._by_parent)

    def match(self, raw_path: str) -> Found | None:
        """The dialect endpoints at this path (any method), with the path's parameters."""
        path = raw_path.partition("?")[0]
        exact = self._exact.get(path)
        if exact is not None:
            return exact[0], exact[1], {}
        parent, _, last = path.rpartition("/")
        templated = self._by_parent.get(parent)
        if templated is not None and last:
            spec, param, methods = templated
            return spec, methods, {param: last}
        return None


def _shadowed(
    router: Router, spec: DialectSpec, path: str, methods: Mapping[str, Endpoint]
) -> list[str]:
    lines = []
    for method in methods:
        match = router.match(path, method)
        if isinstance(match, Match):
            lines.append(f"{method} {path} ({spec.name}, route {match.route.name})")
    return lines


async def serve(
    found: Found, request: web.BaseRequest, store: KeyStore, settings: Settings
) -> web.Response:
    """Authenticate the caller as the dialect's clients do, check the endpoint's scope,
    then let the dialect answer; every refusal is in the dialect's own error shape."""
    spec, methods, params = found
    endpoint = methods.get(request.method)
    if endpoint is None:
        response = spec.error(405, "method_not_allowed", "this path does not take that method")
        response.headers["Allow"] = ", ".join(sorted(methods))
        return response
    credential = extract(request.headers, None, spec.sources)
    if credential.secret is None:
        status = 400 if credential.outcome is Outcome.INVALID_REQUEST else 401
        return spec.error(status, credential.outcome.value, credential.detail)
    try:
        auth = await store.authenticate(credential.secret)
    except STORE_ERRORS as exc:
        log.warning("key store unavailable: %s", type(exc).__name__)
        return spec.error(503, Outcome.STORE_ERROR.value, "the key store is unavailable")
    if auth.status != "ok" or auth.record is None:
        return spec.error(401, Outcome.INVALID_KEY.value, "the API key is not valid")
    if endpoint.scope and not grants(auth.record.scopes, endpoint.scope):
        return spec.error(
            403, Outcome.FORBIDDEN_SCOPE.value, f"this needs the {endpoint.scope} scope"
        )
    call = Call(request, auth.record, auth.now_ms, store, settings, params)
    try:
        return await endpoint.handler(call)
    except STORE_ERRORS as exc:
        log.warning("key store unavailable: %s", type(exc).__name__)
        return spec.error(503, Outcome.STORE_ERROR.value, "the key store is unavailable")
