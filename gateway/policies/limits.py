"""What a route asks of the authorize script besides the key: each policy's values for the
route (gateway/policies/chain.py), and the ledger's lease; and what settlement needs: the
cost meter, charge_failed, the response headers the client never sees.

Built once per route at startup; the per-request work is a dict lookup and the policies'
per-request arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.config.model import RESERVATION_LEASE_MARGIN, Route, Timeouts
from gateway.policies.chain import authorize_layout
from gateway.policies.cost import CostMeter, meter_factory
from gateway.policies.dropped_headers import response_skip
from gateway.policies.policy import Policy
from gateway.policies.spend import SpendSide

# A route built without the loader (which resolves every route's lease): the default
# upstream timeout's.
DEFAULT_LEASE_SECONDS = Timeouts().total + RESERVATION_LEASE_MARGIN
# Where the policies' part of the arguments holds the spend policy's reserve (the frame's
# arguments end with the ledger entry's id).
_RESERVE_AT = authorize_layout().arg("spend_caps.reserve") - authorize_layout().arg("entry") - 1
_TOKENS_AT = authorize_layout().arg("token_limits.estimate") - authorize_layout().arg("entry") - 1
# Methods whose script arguments every route computes at start-up.
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    name: str
    sides: tuple[Any, ...]  # each authorize policy's values for this route, in chain order
    # Whether a policy's arguments depend on the request here (a route naming a resource):
    # then ``by_method`` holds the arguments after the per-request ones, else all of them.
    varies: bool
    by_method: dict[str, tuple[str, ...]]  # the policies' script arguments, per method
    # The policies with per-request arguments and their sides, in chain order.
    per_request: tuple[tuple[Policy[Any], Any], ...]
    # The spend policy's reserve and BYOK flag (gateway/policies/spend.py), for settlement
    # and the workspace budget: micro-units held before forwarding ("" when the route
    # charges nothing), and "1" | "0".
    reserve: str
    byok: str
    charge_failed: bool
    new_meter: Callable[[], CostMeter] | None  # a fresh cost meter per response
    response_skip: frozenset[str]  # response headers the client never sees (cost header)
    lease_ms: str = "330000"  # how long a reservation waits for its settlement
    on_expiry: str = "c"  # what an unsettled reservation becomes: "c" charged, "r" refunded

    @classmethod
    def of(cls, route: Route) -> RoutePolicy:
        layout = authorize_layout()
        sides = tuple(policy.route_side(route) for policy in layout.policies)
        lease_ms = str(round((route.lease_seconds or DEFAULT_LEASE_SECONDS) * 1000))
        on_expiry = (route.on_expiry or "charge")[0]
        spend = next(side for side in sides if isinstance(side, SpendSide))
        varies = any(
            p.varies_per_request(side) for p, side in zip(layout.policies, sides, strict=True)
        )
        fixed = () if varies else layout.request_part(sides, None)
        methods = {*STANDARD_METHODS, *route.methods, *route.scopes} - {"*"}
        return cls(
            name=route.name,
            sides=sides,
            varies=varies,
            by_method={
                m: fixed + layout.route_part(sides, m, lease_ms, on_expiry) for m in methods
            },
            per_request=tuple(
                (p, side)
                for p, side in zip(layout.policies, sides, strict=True)
                if p.request_arg_names
            ),
            reserve=spend.reserve,
            byok=spend.byok,
            charge_failed=route.charge_failed,
            # An LLM route's meter needs its request (gateway/proxy/llm.py makes it).
            new_meter=None
            if route.cost is None or route.cost.llm is not None
            else meter_factory(route.cost),
            response_skip=response_skip(route.cost.header if route.cost else None),
            lease_ms=lease_ms,
            on_expiry=on_expiry,
        )

    def args(
        self,
        method: str,
        resource: str | None,
        reserve: int | None = None,
        tokens: int | None = None,
    ) -> tuple[str, ...]:
        """The policies' script arguments for a request (after the frame's own): computed
        at start-up but for the per-request ones of a route that names a resource, and
        what an LLM request brings of its own: its reservation (``reserve``, micro-units,
        under reserve: auto) and its token estimate (``tokens``, for token limits)."""
        if reserve is not None or tokens is not None:
            found = list(self.args(method, resource))
            if reserve is not None:
                found[_RESERVE_AT] = str(reserve)
            if tokens is not None:
                found[_TOKENS_AT] = str(tokens)
            return tuple(found)
        tail = self.by_method.get(method)
        if tail is None:  # a method no route names and HTTP does not define: rare
            layout = authorize_layout()
            tail = layout.route_part(self.sides, method, self.lease_ms, self.on_expiry)
            if not self.varies:
                return layout.request_part(self.sides, None) + tail
        if not self.varies:
            return tail
        head: tuple[str, ...] = ()
        for policy, side in self.per_request:
            head += policy.request_args(side, resource)
        return head + tail

    def meter(self) -> CostMeter | None:
        """A fresh meter of this request's cost; None when the route charges nothing."""
        return None if self.new_meter is None else self.new_meter()
