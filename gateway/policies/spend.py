"""The spending caps policy: reserve the route's ``reserve`` against every cap of the key
(its ``limit`` and ``spend_caps``), or refuse (402 naming the cap that resets last).

A route that charges nothing (no cost rule) is not subject to caps; a cap already used up
refuses even a request that reserves nothing on a route that charges. The reservation is
counted in the usage buckets at once and recorded in the request's ledger entry, which
settlement trues up (docs/architecture.md, "The reservation ledger").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config.model import Route
from gateway.errors import Outcome
from gateway.policies.policy import Asked, Policy, Refusal
from gateway.store.multiplex import reply_text
from gateway.store.record import MICRO, from_micro, rfc3339


@dataclass(frozen=True, slots=True)
class SpendSide:
    reserve: str  # micro-units held before forwarding; "" when the route charges nothing
    byok: str  # "1" | "0", as the script takes it
    mode: str = "w"  # "w" worst_case: the whole reservation fits | "r" remaining


@dataclass(frozen=True, slots=True)
class BlockedCap:
    """The spending cap that refused a request: the one that resets last."""

    name: str  # "limit" or "spend_caps[i]"
    amount_micro: int
    period: str
    counted_micro: int
    resets_at_ms: int | None  # None: a cap over all time
    reserved_micro: int | None = None  # what the refused request would have held


class SpendPolicy(Policy[SpendSide]):
    name = "spend_caps"
    fields = ("limit_micro", "limit_reset", "include_byok_in_limit", "spend_caps", "cap_base")
    route_arg_names = ("reserve", "byok", "mode")
    ok_names = ("held",)
    # cap name, amount, period, counted spend, resets_at_ms (0: never), the reservation
    refusals = (("spend_limited", 6),)
    lua = """
-- ARG.reserve: micro-units to hold ('' for a route that charges nothing: caps do not
-- apply to it; the proxy puts a request's own estimate here under reserve: auto);
-- ARG.byok: '1' on a BYOK route; ARG.mode: 'w' the whole reservation must fit under
-- every cap, 'r' admit while every cap has room left and hold at most that room.
local reserve, byok = tonumber(ARG.reserve) or 0, ARG.byok == '1'
local cap_buckets = nil
--@check
local with_byok = FIELD.include_byok_in_limit == '1'
if ARG.reserve ~= '' and (FIELD.limit_micro or FIELD.spend_caps) and (not byok or with_byok) then
  cap_buckets = buckets_at(now, ARGV, ARG_AT.hint)
  local base = FIELD.cap_base and cjson.decode(FIELD.cap_base) or {} -- [bucket, micro] per cap
  local blocking, room = nil, nil
  local whole = ARG.mode ~= 'r'
  for i, cap in ipairs(caps_of(FIELD.limit_micro, FIELD.limit_reset, FIELD.spend_caps)) do
    local used = counted(KEY.usage, cap, cap_buckets, with_byok, base[i])
    if not whole and used < cap[2] and (not room or cap[2] - used < room) then
      room = cap[2] - used
    end
    if used >= cap[2] or (whole and used + reserve > cap[2]) then
      local at = resets_at(cap, cap_buckets)
      -- Report the cap that blocks longest: the request can pass only once it resets.
      if not blocking or at == 0 or (blocking[5] ~= 0 and at > blocking[5]) then
        blocking = {cap[1], cap[2], cap[3], used, at}
      end
    end
  end
  if blocking then
    blocking[6] = reserve
    return refuse('spend_limited', unpack(blocking))
  end
  if room and room < reserve then reserve = room end
end
--@commit
if reserve > 0 then
  add_usage(KEY.usage, cap_buckets or buckets_at(now, ARGV, ARG_AT.hint), byok, reserve)
end
entry_amount, entry_byok = reserve, byok
if ARG.reserve ~= '' then entry_wanted = true end
--@ok
reserve
"""

    def route_side(self, route: Route) -> SpendSide:
        reserve = route.reserve
        if reserve is None:  # the fixed cost is known in advance; other rules reserve 0
            reserve = route.cost.fixed if route.cost and route.cost.fixed is not None else 0.0
        return SpendSide(
            reserve="" if route.cost is None else str(round(reserve * MICRO)),
            byok="1" if route.byok else "0",
            mode="r" if route.reserve_mode == "remaining" else "w",
        )

    def route_args(self, side: SpendSide) -> tuple[str, ...]:
        return (side.reserve, side.byok, side.mode)

    def decode(self, status: str, notes: Sequence[Any], values: Sequence[Any]) -> BlockedCap:
        name, amount, period, counted, resets, reserved = values
        return BlockedCap(
            reply_text(name),
            int(amount),
            reply_text(period),
            int(counted),
            int(resets) or None,
            int(reserved),
        )

    def refusal(self, status: str, refused: Any, side: SpendSide, asked: Asked) -> Refusal:
        reserved = refused.reserved_micro
        return spend_refusal(
            refused, asked.now_ms, int(side.reserve or 0) if reserved is None else reserved
        )


def spend_refusal(cap: BlockedCap, now_ms: int, reserved: int, whose: str = "the key's") -> Refusal:
    """402 naming the cap: its amount, what is used, what this request reserves (the
    route's reserve) and when it resets; Retry-After until then. A cap is either used up
    or has room, but not for this request's reservation: the detail says which.
    ``whose``: the cap's holder as the detail names it (a workspace's budget too)."""
    if cap.resets_at_ms is None:
        which, until, headers = f"{cap.name} over all time", "", {}
    else:
        which = f"{cap.period} {cap.name}"
        until = f"; it resets at {rfc3339(cap.resets_at_ms)}"
        headers = {"Retry-After": str(max(1, -(-(cap.resets_at_ms - now_ms) // 1000)))}
    amount, used = credits(cap.amount_micro), credits(cap.counted_micro)
    if cap.counted_micro >= cap.amount_micro:
        detail = f"{whose} {which} of {amount} is used up ({used} used){until}"
    else:
        detail = (
            f"{whose} {which} is {amount}: {used} is used and this request reserves "
            f"{credits(reserved)}, which would pass it{until}"
        )
    return Refusal(
        Outcome.SPEND_LIMITED,
        detail,
        headers=headers,
        extra={
            "cap": {
                "name": cap.name,
                "amount": from_micro(cap.amount_micro),
                "period": cap.period,
                "used": from_micro(cap.counted_micro),
                "reserved": from_micro(reserved),
                "resets_at": rfc3339(cap.resets_at_ms),
            }
        },
    )


def credits(micro: int) -> str:
    """Credits as a person reads them: exact to the micro-unit, no exponent, no trailing
    zeros (4.5, 1000000, 0.000001)."""
    return f"{micro / MICRO:.6f}".rstrip("0").rstrip(".")
