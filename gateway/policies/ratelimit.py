"""Rate-limit headers of the IETF draft (draft-ietf-httpapi-ratelimit-headers-10).

The limit itself is decided, and these values written, by the authorize script (GCRA,
gateway/store/lua/authorize.lua); this module only puts them on the wire:

    RateLimit-Policy: "key";q=100;w=60      100 requests per 60 s, the key's own limit
    RateLimit: "key";r=42;t=35              42 left now; the whole quota is back in 35 s

The policy is named "key" for a key's own limit and "route" for the route's default.
"""

from __future__ import annotations

from typing import NamedTuple


class RateState(NamedTuple):
    """The rate limit that applied, as the IETF draft's header values (authorize.lua
    writes them), for every response to the key and for 429s."""

    policy: str  # RateLimit-Policy, e.g. "key";q=100;w=60
    current: str  # RateLimit, e.g. "key";r=42;t=35
    retry_after: int  # seconds until the next request is allowed (for a 429)


def headers(rate: RateState) -> tuple[tuple[str, str], tuple[str, str]]:
    """The two header fields every response to a rate-limited key carries."""
    return (("RateLimit-Policy", rate.policy), ("RateLimit", rate.current))


def denied_headers(rate: RateState) -> dict[str, str]:
    """A 429's headers: the draft's two fields and Retry-After."""
    return {
        "RateLimit-Policy": rate.policy,
        "RateLimit": rate.current,
        "Retry-After": str(rate.retry_after),
    }
