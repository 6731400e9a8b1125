"""Which header names never pass keygate, in either direction.

Hop-by-hop headers (RFC 9110 §7.6.1, plus the de facto ones proxies drop) and the request
id, which keygate sets itself; on a response also the header a route's cost rule reads.
The proxy's header rules (gateway/proxy/headers.py) apply these sets; a route's policy
(gateway/policies/limits.py) builds its response set once, at startup.
"""

from __future__ import annotations

HOP_BY_HOP = frozenset(
    (
        "connection",
        "expect",  # answered here (100 Continue); the upstream gets the body without asking
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)
ALWAYS_REPLACED = HOP_BY_HOP | {"host", "x-request-id"}  # lower-case names


def response_skip(hidden: str | None) -> frozenset[str]:
    """The lower-case names never passed to the client: hop-by-hop, the request id (ours
    replaces it) and ``hidden`` (a cost header keygate reads). Built once per route."""
    return ALWAYS_REPLACED | {hidden.lower()} if hidden else ALWAYS_REPLACED
