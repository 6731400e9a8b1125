"""The token limits policy: a key's ``token_limits`` (LLM tokens, input plus output, per
fixed window), 429 ``token_rate_limited`` with the IETF draft's headers for the token
policy.

Exact across replicas: the check and the count are in the authorize script, atomic on the
key's slot. A request reserves its estimate (gateway/proxy/llm.py: its body's size as
input tokens, plus its output bound) in the window it was admitted in, and its ledger
entry remembers the estimate; its settlement replaces the estimate with the tokens its
answer used (apply_settlements in lib.lua), in that window if it is still the current
one. An answer whose usage is unknown keeps its estimate. The windows live in the key's
record (fields ``tk_w<i>``, the window's number, and ``tk_u<i>``, tokens used), which the
script reads anyway: no Redis name of its own. A route that is not an LLM route counts no
tokens and is not limited by them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config.model import Route
from gateway.errors import Outcome
from gateway.policies.policy import Asked, Policy, Refusal
from gateway.store.input import MAX_TOKEN_LIMITS

# The record fields of the windows: tk_w1..tk_w4, tk_u1..tk_u4.
_WINDOW_FIELDS = tuple(f"tk_{kind}{i}" for i in range(1, MAX_TOKEN_LIMITS + 1) for kind in "wu")


@dataclass(frozen=True, slots=True)
class TokenRefusal:
    """The token limit that refused a request."""

    tokens: int  # the limit
    period_ms: int
    used: int  # in the current window, before this request
    estimate: int  # what this request would have reserved
    reset_ms: int  # until the window ends


class TokenLimitPolicy(Policy[None]):
    name = "token_limits"
    fields = ("token_limits", *_WINDOW_FIELDS)
    request_arg_names = ()
    route_arg_names = ("estimate",)
    refusals = (("token_rate_limited", 5),)  # limit, period ms, used, estimate, reset ms
    lua = """
-- ARG.estimate: this request's token estimate ('' on a route that counts no tokens: the
-- proxy puts it here per request on an LLM route).
local token_limits, token_estimate = nil, tonumber(ARG.estimate)
local token_window, token_used = {}, {}
--@check
if token_estimate and FIELD.token_limits then
  token_limits = cjson.decode(FIELD.token_limits) -- [[tokens, period seconds], ...]
  local windows = {FIELD.tk_w1, FIELD.tk_w2, FIELD.tk_w3, FIELD.tk_w4}
  local counts = {FIELD.tk_u1, FIELD.tk_u2, FIELD.tk_u3, FIELD.tk_u4}
  for i, limit in ipairs(token_limits) do
    local period = math.floor(limit[2] * 1000)
    local window = math.floor(now / period)
    local used = 0
    if tonumber(windows[i] or '') == window then used = tonumber(counts[i]) end
    token_window[i], token_used[i] = window, used
    if used + token_estimate > limit[1] then
      return refuse('token_rate_limited', limit[1], period, used, token_estimate,
        (window + 1) * period - now)
    end
  end
end
--@commit
if token_limits then
  local writes = {}
  for i in ipairs(token_limits) do
    writes[#writes + 1] = 'tk_w' .. i
    writes[#writes + 1] = token_window[i]
    writes[#writes + 1] = 'tk_u' .. i
    writes[#writes + 1] = token_used[i] + token_estimate
  end
  redis.call('HSET', KEY.record, unpack(writes))
  entry_tokens, entry_wanted = token_estimate, true
end
"""

    def route_side(self, route: Route) -> None:
        return None

    def route_args(self, side: None) -> tuple[str, ...]:
        return ("",)  # the proxy puts an LLM request's estimate here

    def decode(self, status: str, notes: Sequence[Any], values: Sequence[Any]) -> TokenRefusal:
        return TokenRefusal(*(int(v) for v in values))

    def refusal(self, status: str, refused: Any, side: None, asked: Asked) -> Refusal:
        limit: TokenRefusal = refused
        window_s = max(1, -(-limit.period_ms // 1000))
        reset_s = max(1, -(-limit.reset_ms // 1000))
        left = max(0, limit.tokens - limit.used)
        if limit.estimate > limit.tokens:
            why = (
                f"this request may use up to {limit.estimate} tokens, more than the key's "
                f"limit of {limit.tokens} per {window_s} s allows at all; lower max_tokens"
            )
        else:
            why = (
                f"this key's token limit of {limit.tokens} per {window_s} s has {left} left "
                f"and this request may use up to {limit.estimate}; retry in {reset_s} s"
            )
        return Refusal(
            Outcome.TOKEN_RATE_LIMITED,
            why,
            headers={
                "RateLimit-Policy": f'"tokens";q={limit.tokens};w={window_s}',
                "RateLimit": f'"tokens";r={left};t={reset_s}',
                "Retry-After": str(reset_s),
            },
            extra={
                "token_limit": {
                    "tokens": limit.tokens,
                    "period_seconds": limit.period_ms / 1000,
                    "used": limit.used,
                    "requested": limit.estimate,
                }
            },
        )
