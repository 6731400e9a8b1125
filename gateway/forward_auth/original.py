"""Which request a proxy asks keygate about: each caller contract's way of naming the
original method and target (README, "Already run nginx, Traefik, Caddy or Envoy?").

- nginx ``auth_request`` / ingress-nginx ``auth-url``: ``X-Original-Method`` and
  ``X-Original-URI`` (path and query), set by the config in deploy/forward-auth/.
- Traefik ForwardAuth and Caddy ``forward_auth``: ``X-Forwarded-Method`` and
  ``X-Forwarded-Uri``.
- Envoy ``ext_authz`` (HTTP service, ``path_prefix: /auth/envoy``): the check request
  keeps the original method, and its target is the prefix followed by the original one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from multidict import CIMultiDictProxy
from yarl import URL

Caller = Literal["nginx", "traefik", "caddy", "envoy"]
ENVOY_PREFIX = "/auth/envoy"
_CALLERS: dict[str, Caller] = {
    "/auth/nginx": "nginx",
    "/auth/traefik": "traefik",
    "/auth/caddy": "caddy",
}
_HEADERS: dict[Caller, tuple[str, str]] = {
    "nginx": ("X-Original-Method", "X-Original-URI"),
    "traefik": ("X-Forwarded-Method", "X-Forwarded-Uri"),
    "caddy": ("X-Forwarded-Method", "X-Forwarded-Uri"),
}
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


@dataclass(frozen=True, slots=True)
class Original:
    """The request a proxy holds back until keygate answers."""

    caller: Caller
    method: str
    target: str  # origin-form: path and query, as the client sent them


def caller_of(raw_path: str) -> Caller | None:
    """The contract a check request's target names, or None when it names none."""
    path = raw_path.partition("?")[0]
    found = _CALLERS.get(path)
    if found is not None:
        return found
    if path == ENVOY_PREFIX or path.startswith(ENVOY_PREFIX + "/"):
        return "envoy"
    return None


def original_request(
    caller: Caller, method: str, raw_path: str, headers: CIMultiDictProxy[str]
) -> Original | str:
    """The original request of a check request, or what is wrong with it (the proxy's
    config, not the client: say which header is missing)."""
    if caller == "envoy":
        target = raw_path[len(ENVOY_PREFIX) :] or "/"
        if not target.startswith("/"):
            target = "/" + target
        return Original(caller, method, target)
    method_header, target_header = _HEADERS[caller]
    methods = headers.getall(method_header, [])
    targets = headers.getall(target_header, [])
    if caller == "nginx" and len(full := headers.getall("X-Original-URL", [])) == 1:
        # ingress-nginx always sets X-Original-URL (X-Original-URI only with auth-method,
        # else a client's own copy would pass through): the target is its path and query.
        url = URL(full[0].strip())
        if url.is_absolute() and url.raw_path.startswith("/"):
            targets = [url.raw_path_qs]
    if len(methods) != 1 or len(targets) != 1:
        return f"{method_header} and {target_header}: each must be given once by the proxy"
    original_method = methods[0].strip().upper()
    if original_method not in _METHODS:
        return f"{method_header}: {original_method[:20]!r} is not an HTTP method keygate routes"
    target = targets[0].strip()
    if not target.startswith("/"):
        return f"{target_header}: must be the request's path and query, starting with '/'"
    return Original(caller, original_method, target)
