"""Header rules of a proxy: hop-by-hop, forwarding, identity and request ids.

The names dropped either way are gateway/policies/dropped_headers.py's.
"""

from __future__ import annotations

import itertools
import os
import re

from multidict import CIMultiDictProxy, istr

from gateway.policies.dropped_headers import ALWAYS_REPLACED
from gateway.proxy.context import KeyIdentity

REQUEST_ID = istr("X-Request-Id")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# A request id needs to be unique, not secret: a random per-process prefix and a counter
# give that without a getrandom() system call per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def request_id(incoming: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new unique one."""
    if incoming is not None and _REQUEST_ID_OK.match(incoming):
        return incoming
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"  # 32 hex digits, like a uuid4 hex


# A client's own claims about where it connects from: keygate states these (below).
_REQUEST_REPLACED = ALWAYS_REPLACED | {"forwarded", "x-real-ip"}
Headers = list[tuple[str, str]]  # handed to aiohttp as is: no intermediate multidict


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    drop: tuple[str, ...],
    key: KeyIdentity | None,
    request_id_value: str,
    client_ip: str | None,
    scheme: str,
) -> Headers:
    """Headers for the upstream: hop-by-hop and credentials removed, identity added.

    Any ``X-Keygate-*`` header the client sent is dropped first, so an upstream can trust
    the ones it sees. ``X-Real-IP`` is the connecting address, whatever the client said; a
    client's ``Forwarded`` chain is kept only with keygate's element appended (RFC 7239 §4),
    as X-Forwarded-For is extended, so its last element is always one keygate wrote.
    """
    skip = _REQUEST_REPLACED
    if drop or "Connection" in incoming:
        skip = skip | {d.lower() for d in drop} | _connection_tokens(incoming)
    out: Headers = []
    for name, value in incoming.items():
        # CGI-style upstreams read X_Keygate_Key_Id as X-Keygate-Key-Id: strip both.
        lower = name.lower().replace("_", "-")
        if lower in skip or lower.startswith(("x-keygate-", "x-forwarded-")):
            continue
        out.append((name, value))
    forwarded_for = ", ".join(incoming.getall("X-Forwarded-For", ()))
    if client_ip:
        forwarded_for = f"{forwarded_for}, {client_ip}" if forwarded_for else client_ip
    if forwarded_for:
        out.append(("X-Forwarded-For", forwarded_for))
    out.append(("X-Forwarded-Proto", scheme))
    host = incoming.get("Host")
    if host is not None:
        out.append(("X-Forwarded-Host", host))
    if client_ip:
        out.append(("X-Real-IP", client_ip))
    if "Forwarded" in incoming:  # none sent, none invented: X-Forwarded-* say the same
        chain = (*incoming.getall("Forwarded"), _forwarded_element(client_ip, scheme, host))
        out.append(("Forwarded", ", ".join(chain)))
    out.append(("X-Request-Id", request_id_value))
    if key is not None:
        out.append(("X-Keygate-Key-Id", key.id))
        out.append(("X-Keygate-Workspace-Id", key.workspace_id))
        out.append(("X-Keygate-Scopes", key.scopes_header))
    return out


def _forwarded_element(client_ip: str | None, scheme: str, host: str | None) -> str:
    """keygate's hop as a Forwarded element: ``for=...;proto=...;host="..."``."""
    if not client_ip:
        node = "unknown"
    elif ":" in client_ip:  # IPv6: bracketed, and quoted since ':' is no token character
        node = f'"[{client_ip}]"'
    else:
        node = client_ip
    element = f"for={node};proto={scheme}"
    if host is not None:
        quoted = host.replace("\\", "\\\\").replace('"', '\\"')
        element += f';host="{quoted}"'
    return element


def client_response_headers(
    upstream: CIMultiDictProxy[str], request_id_value: str, skip: frozenset[str] = frozenset()
) -> Headers:
    """Upstream response headers for the client, without those in ``skip`` (see
    gateway/policies/dropped_headers.py:response_skip) and those the upstream's Connection
    header names."""
    skip = skip or ALWAYS_REPLACED
    if "Connection" in upstream:
        skip = skip | _connection_tokens(upstream)
    out: Headers = [(n, v) for n, v in upstream.items() if n.lower() not in skip]
    out.append(("X-Request-Id", request_id_value))
    return out
