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

from gateway.bodies import ClientLeft
from gateway.config.model import DIALECTS, Route, Settings
from gateway.credentials import extract
from gateway.dialects.base import Call, DialectSpec, Endpoint
from gateway.errors import Outcome
from gateway.policies.routing import Match, Router
from gateway.policies.scopes import grants
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
            for endpoint in _enabled_endpoints(settings, name, spec):
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
        for each endpoint a route would otherwise forward (dialects are matched first),
        leaving out routes that say ``yield_to_dialects``."""
        found = []
        for path, (spec, methods) in self._exact.items():
            found += _shadowed(router, spec, path, methods)
        for parent, (spec, param, methods) in self._by_parent.items():
            found += _shadowed(router, spec, f"{parent}/{{{param}}}", methods)
        return found

    def __bool__(self) -> bool:
        return bool(self._exact or self._by_parent)

    def match(self, path: str) -> Found | None:
        """The dialect endpoints at this normalised path (any method, no query), with the
        path's parameters."""
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
        if isinstance(match, Match) and not match.route.yield_to_dialects:
            lines.append(f"{method} {path} ({spec.name}, route {match.route.name})")
    return lines


def _enabled_endpoints(settings: Settings, name: str, spec: DialectSpec) -> tuple[Endpoint, ...]:
    """A listing dialect's endpoints at its configured path, none unless it is enabled; a
    spec of keygate's own (``/metrics`` on the proxy, asked for by its own option) as is."""
    if name not in DIALECTS:
        return spec.endpoints(spec.default_path)
    configured = settings.dialects.get(name)
    if configured is None or not configured.enabled:
        return ()
    return spec.endpoints(configured.path or spec.default_path)


def shadowed_routes(settings: Settings) -> list[str]:
    """Config problems: one line per route and enabled dialect whose endpoints the route
    would otherwise get (dialects answer first), unless the route says
    ``yield_to_dialects: true``. A route silently losing requests is never what was meant.
    """
    router = Router(settings.routes, settings.upstreams)
    index = {route.name: i for i, route in enumerate(settings.routes)}
    problems: list[tuple[int, str]] = []
    for name, spec in registry().items():
        taken: dict[str, list[str]] = {}  # route name -> "METHOD /path" it loses
        for endpoint in _enabled_endpoints(settings, name, spec):
            for route in _takers(router, settings, endpoint):
                if not route.yield_to_dialects:
                    taken.setdefault(route.name, []).append(f"{endpoint.method} {endpoint.path}")
        for route_name, endpoints in taken.items():
            i = index[route_name]
            problems.append(
                (
                    i,
                    f"routes[{i}]: dialects.{name} takes {', '.join(endpoints)} from this "
                    f"route ({route_name}): set yield_to_dialects: true on the route, or move "
                    f"(dialects.{name}.path) or disable the dialect",
                )
            )
    return [line for _, line in sorted(problems, key=lambda problem: problem[0])]


def _takers(router: Router, settings: Settings, endpoint: Endpoint) -> list[Route]:
    """The routes that would get requests to ``endpoint`` if no dialect answered: the one
    the router picks for the path, and for a ``{param}`` segment any exact route at a
    path the parameter matches."""
    found = []
    match = router.match(endpoint.path, endpoint.method)
    if isinstance(match, Match):
        found.append(match.route)
    parent, _, last = endpoint.path.rpartition("/")
    if last.startswith("{") and last.endswith("}"):
        for route in settings.routes:
            if route.path is None or route in found:
                continue
            route_parent, _, route_last = route.path.rpartition("/")
            allowed = not route.methods or endpoint.method in route.methods
            if route_parent == parent and route_last and allowed:
                found.append(route)
    return found


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
    except ClientLeft:  # mid-body: nobody to answer, and no store failed
        log.debug("client left during %s %s before sending its body", request.method, spec.name)
        return spec.error(400, Outcome.INVALID_REQUEST.value, "the body ended early")
    except STORE_ERRORS as exc:
        log.warning("key store unavailable: %s", type(exc).__name__)
        return spec.error(503, Outcome.STORE_ERROR.value, "the key store is unavailable")
