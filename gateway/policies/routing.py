"""Route matching: exact paths first, then the longest prefix, then the method."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config.model import Route, Upstream


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    upstream: Upstream
    upstream_path: str  # the normalised path to send upstream, after strip/rewrite


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    allowed: tuple[str, ...]


def _matches(route: Route, path: str) -> bool:
    if route.path is not None:
        return path == route.path
    prefix = (route.prefix or "/").rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


def _specificity(route: Route) -> tuple[int, int]:
    # Exact paths beat prefixes; longer prefixes beat shorter ones.
    return (1, len(route.path)) if route.path is not None else (0, len(route.prefix or ""))


class Router:
    """Built once at startup; ``match`` is pure and allocation-light."""

    def __init__(self, routes: Iterable[Route], upstreams: dict[str, Upstream]) -> None:
        self._routes = sorted(routes, key=_specificity, reverse=True)
        self._upstreams = upstreams

    def match(self, path: str, method: str) -> Match | MethodNotAllowed | None:
        allowed: list[str] = []
        for route in self._routes:
            if not _matches(route, path):
                continue
            if route.methods and method not in route.methods:
                allowed.extend(route.methods)
                continue
            return Match(route, self._upstreams[route.upstream], _upstream_path(route, path))
        return MethodNotAllowed(tuple(dict.fromkeys(allowed))) if allowed else None


def _upstream_path(route: Route, path: str) -> str:
    if route.rewrite is not None:
        if route.prefix is None:
            return route.rewrite
        rest = path[len(route.prefix.rstrip("/")) :]
        return route.rewrite.rstrip("/") + rest if rest else route.rewrite
    if route.strip_prefix and route.prefix is not None:
        rest = path[len(route.prefix.rstrip("/")) :]
        return rest if rest.startswith("/") else "/" + rest
    return path
