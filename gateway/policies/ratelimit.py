"""Rate-limit headers of the IETF draft (draft-ietf-httpapi-ratelimit-headers-10).

The limit itself is decided in the authorize script (GCRA, gateway/store/lua/
authorize.lua); this module only says it on the wire:

    RateLimit-Policy: "key";q=100;w=60      100 requests per 60 s, the key's own limit
    RateLimit: "key";r=42;t=35              42 left now; the whole quota is back in 35 s

The policy is named "key" for a key's own limit and "route" for the route's default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.proxy.authorize import RateState


def _seconds(ms: int) -> int:
    return max(0, -(-ms // 1000))  # rounded up: a client that waits this long is admitted


def headers(rate: RateState) -> list[tuple[str, str]]:
    """The two header fields every response to a rate-limited key carries."""
    window = max(1, _seconds(rate.window_ms))
    return [
        ("RateLimit-Policy", f'"{rate.policy}";q={rate.requests};w={window}'),
        ("RateLimit", f'"{rate.policy}";r={rate.remaining};t={_seconds(rate.full_in_ms)}'),
    ]


def denied_headers(rate: RateState) -> dict[str, str]:
    """A 429's headers: the draft's two fields and Retry-After."""
    out = dict(headers(rate))
    out["Retry-After"] = str(max(1, _seconds(rate.retry_in_ms)))
    return out
