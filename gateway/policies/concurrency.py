"""The concurrency policy: a key's ``max_in_flight`` (429 concurrency_limited).

Exact across replicas: the count is the key's pending ledger entries whose lease has not
ended (KEY.pending, by lease end), in the same atomic script that admits. Every request
such a key admits gets a ledger entry (amount 0 on a route that charges nothing), listed
there too; settling or resolving it frees the slot. Entries written before the limit was
set are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.config.model import Route
from gateway.errors import Outcome
from gateway.policies.policy import Asked, Policy, Refusal


class ConcurrencyPolicy(Policy[None]):
    name = "concurrency"
    fields = ("max_in_flight",)
    refusals = (("concurrency_limited", 2),)  # the key's limit, its requests in flight
    lua = """
local max_in_flight
--@check
max_in_flight = tonumber(FIELD.max_in_flight or '')
if max_in_flight then
  -- Entries whose lease ended were resolved above (or are by a later call): no slot.
  local held = redis.call('ZCOUNT', KEY.pending, '(' .. now, '+inf')
  if held >= max_in_flight then return refuse('concurrency_limited', max_in_flight, held) end
end
--@commit
if max_in_flight then
  entry_wanted = true
  if entry_id ~= '' then redis.call('ZADD', KEY.pending, lease_end, entry_id) end
end
"""

    def route_side(self, route: Route) -> None:
        return None

    def decode(self, status: str, notes: Sequence[Any], values: Sequence[Any]) -> int:
        return int(values[0])  # the key's limit

    def refusal(self, status: str, refused: Any, side: None, asked: Asked) -> Refusal:
        # Retry-After 1: a slot frees when any request of the key ends, which is not known.
        return Refusal(
            Outcome.CONCURRENCY_LIMITED,
            f"this key allows {refused} requests in flight at once, and that many are; "
            "retry shortly",
            headers={"Retry-After": "1"},
        )
