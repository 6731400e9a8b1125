"""Header rules of a proxy: hop-by-hop, forwarding, identity and request ids."""

from __future__ import annotations

import os
import re

from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.proxy.context import KeyIdentity

# RFC 9110 §7.6.1, plus the de facto ones proxies drop.
HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
IDENTITY_PREFIX = "x-keygate-"
REQUEST_ID = istr("X-Request-Id")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(incoming: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    if incoming is not None and _REQUEST_ID_OK.match(incoming):
        return incoming
    return os.urandom(16).hex()  # as random as uuid4, without building a UUID object


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
) -> CIMultiDict[str]:
    """Headers for the upstream: hop-by-hop and credentials removed, identity added.

    Any ``X-Keygate-*`` header the client sent is dropped first, so an upstream can trust
    the ones it sees.
    """
    named = _connection_tokens(incoming)
    dropped = {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        # CGI-style upstreams read X_Keygate_Key_Id as X-Keygate-Key-Id: strip both.
        lower = name.lower().replace("_", "-")
        if (
            name in HOP_BY_HOP
            or lower in named
            or lower in dropped
            or lower == "host"
            or lower.startswith(IDENTITY_PREFIX)
            or lower.startswith("x-forwarded-")
        ):
            continue
        out.add(name, value)
    forwarded_for = ", ".join(incoming.getall("X-Forwarded-For", ())) or None
    if client_ip:
        forwarded_for = f"{forwarded_for}, {client_ip}" if forwarded_for else client_ip
    if forwarded_for:
        out["X-Forwarded-For"] = forwarded_for
    out["X-Forwarded-Proto"] = scheme
    if "Host" in incoming:
        out["X-Forwarded-Host"] = incoming["Host"]
    out[REQUEST_ID] = request_id_value
    if key is not None:
        out["X-Keygate-Key-Id"] = key.id
        out["X-Keygate-Workspace-Id"] = key.workspace_id
        out["X-Keygate-Scopes"] = " ".join(key.scopes)
    return out


def client_response_headers(
    upstream: CIMultiDictProxy[str], request_id_value: str
) -> CIMultiDict[str]:
    """Upstream response headers for the client, hop-by-hop removed."""
    named = _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name in HOP_BY_HOP or name.lower() in named:
            continue
        out.add(name, value)
    out[REQUEST_ID] = request_id_value
    return out
