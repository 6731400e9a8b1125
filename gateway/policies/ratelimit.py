"""Rate-limit headers of the IETF draft (draft-ietf-httpapi-ratelimit-headers-10).

The limit itself is decided, and these values written, by this module's fragment of the
authorize script (GCRA, ``RateLimitPolicy`` below); the rest only puts them on the wire:

    RateLimit-Policy: "key";q=100;w=60      100 requests per 60 s, the key's own limit
    RateLimit: "key";r=42;t=35              42 left now; the whole quota is back in 35 s

The policy is named "key" for a key's own limit and "route" for the route's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from gateway.config.model import Route
from gateway.errors import Outcome
from gateway.policies.policy import Asked, Policy, Refusal
from gateway.store.multiplex import reply_text
from gateway.store.names import KeyNames


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


def state_at(reply: Sequence[Any], at: int) -> RateState | None:
    """The rate fields a reply holds from index ``at`` (the rate limit's notes), or None
    when no rate limit applies to the key on its route."""
    policy = reply[at]
    if not policy:
        return None
    return RateState(reply_text(policy), reply_text(reply[at + 1]), int(reply[at + 2]))


class RateLimitPolicy(Policy[tuple[str, str]]):
    """GCRA, the key's own limit or else the route's default (429 with the draft's
    headers). Its state is read before the scopes and resource are checked, so that every
    refusal can carry the rate fields (the notes): every response to the key has them."""

    name = "rate_limit"
    fields = ("rate_limit",)
    keys = ("rate", "route_rate")
    route_arg_names = ("requests", "period_ms")
    note_names = ("policy", "current", "retry_after")
    refusals = (("rate_limited", 0),)

    def redis_keys(self, names: KeyNames, key_id: str, route: str) -> tuple[str, ...]:
        rate = names.rate(key_id)
        return (rate, f"{rate}:{route}")

    lua = """
-- GCRA over integer microseconds. A burst of `requests` is allowed, then one per
-- period/requests; the interval is rounded up, so rounding never admits extra.
-- ARG.requests, ARG.period_ms: the route's default ('' none); the key's own (the record's
-- rate_limit, [requests, period seconds]) wins. KEY.rate: the key's state,
-- KEY.route_rate: its state under the route's default.
local requests, period_us, rate_key, rate_policy
local interval, window, tat, new_tat, allow_at
-- The IETF draft's header values are written here, where the numbers are, so the proxy
-- only copies them: RateLimit-Policy, RateLimit, and Retry-After (seconds).
local function rate_fields(remaining, full_in_us, retry_in_us)
  return string.format('"%s";q=%d;w=%d', rate_policy, requests,
      math.max(1, math.ceil(window / 1e6))),
    string.format('"%s";r=%d;t=%d', rate_policy, remaining, math.ceil(full_in_us / 1e6)),
    math.max(1, math.ceil(retry_in_us / 1e6))
end
--@prepare
-- Read before the scopes and resource are checked, so that their refusals show it too.
if FIELD.rate_limit then
  local spec = cjson.decode(FIELD.rate_limit)
  requests, period_us = spec[1], math.ceil(spec[2] * 1000000)
  rate_key, rate_policy = KEY.rate, 'key'
elseif ARG.requests ~= '' then
  requests, period_us = tonumber(ARG.requests), tonumber(ARG.period_ms) * 1000
  rate_key, rate_policy = KEY.route_rate, 'route'
end
if requests then
  interval = math.ceil(period_us / requests)
  window = interval * requests
  tat = tonumber(redis.call('GET', rate_key) or '0')
  if tat < now_us then tat = now_us end
  new_tat = tat + interval
  allow_at = new_tat - window
end
--@check
if requests and now_us < allow_at then return refuse('rate_limited') end
--@commit
if new_tat then
  -- Kept a second longer than it matters (an arrival time in the past reads as "now"),
  -- so that a test's clock running ahead of the server's cannot expire it early.
  redis.call('SET', rate_key, string.format('%.0f', new_tat), 'PX',
    math.ceil((new_tat - now_us) / 1000) + 1000)
end
--@note
-- '', '', 0 when no rate limit applies. Admitted: the state after this request; else the
-- state without it.
if not requests then return '', '', 0 end
if admitted then
  return rate_fields(math.floor((now_us - allow_at) / interval), new_tat - now_us, 0)
end
return rate_fields(math.max(0, math.min(requests, math.floor((now_us - allow_at) / interval) + 1)),
  tat - now_us, allow_at - now_us)
"""

    def route_side(self, route: Route) -> tuple[str, str]:
        """The route's default: requests and period (ms), "" each when it sets none."""
        rate = route.rate_limit
        if rate is None:
            return ("", "")
        return (str(rate.requests), str(round(rate.period_seconds * 1000)))

    def route_args(self, side: tuple[str, str]) -> tuple[str, ...]:
        return side

    def decode(self, status: str, notes: Sequence[Any], values: Sequence[Any]) -> RateState:
        state = state_at(notes, 0)
        assert state is not None  # refused by a rate limit: one applies
        return state

    def refusal(self, status: str, refused: Any, side: tuple[str, str], asked: Asked) -> Refusal:
        rate: RateState = refused
        return Refusal(
            Outcome.RATE_LIMITED,
            f"this key's rate limit ({rate.policy}) is reached; retry in {rate.retry_after} s",
            headers=denied_headers(rate),
        )
