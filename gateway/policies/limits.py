"""What a route asks of the authorize script besides the key: the scopes a method needs,
the cost to reserve, BYOK accounting and the default rate limit (docs/architecture.md).

Built once per route at startup; the per-request work is a dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.config.model import RESERVATION_LEASE_MARGIN, Route, Timeouts
from gateway.policies.cost import CostMeter, meter_factory
from gateway.policies.dropped_headers import response_skip
from gateway.store.record import MICRO

# A route built without the loader (which resolves every route's lease): the default
# upstream timeout's.
DEFAULT_LEASE_SECONDS = Timeouts().total + RESERVATION_LEASE_MARGIN


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    name: str
    scopes_by_method: dict[str, str]  # method or "*" -> needed scopes, space-separated
    reserve: str  # micro-units held before forwarding; "" when the route charges nothing
    byok: str  # "1" | "0", as the script takes it
    rate_requests: str  # "" when the route sets no default
    rate_period_ms: str
    charge_failed: bool
    names_resource: bool  # the route has a resource rule (checked against allow-lists)
    new_meter: Callable[[], CostMeter] | None  # a fresh cost meter per response
    response_skip: frozenset[str]  # response headers the client never sees (cost header)
    lease_ms: str = "330000"  # how long a reservation waits for its settlement
    on_expiry: str = "c"  # what an unsettled reservation becomes: "c" charged, "r" refunded

    @classmethod
    def of(cls, route: Route) -> RoutePolicy:
        reserve = route.reserve
        if reserve is None:  # the fixed cost is known in advance; other rules reserve 0
            reserve = route.cost.fixed if route.cost and route.cost.fixed is not None else 0.0
        rate = route.rate_limit
        return cls(
            name=route.name,
            scopes_by_method={m: " ".join(s) for m, s in route.scopes.items()},
            reserve="" if route.cost is None else str(round(reserve * MICRO)),
            byok="1" if route.byok else "0",
            rate_requests="" if rate is None else str(rate.requests),
            rate_period_ms="" if rate is None else str(round(rate.period_seconds * 1000)),
            charge_failed=route.charge_failed,
            names_resource=route.resource is not None,
            new_meter=None if route.cost is None else meter_factory(route.cost),
            response_skip=response_skip(route.cost.header if route.cost else None),
            lease_ms=str(round((route.lease_seconds or DEFAULT_LEASE_SECONDS) * 1000)),
            on_expiry=(route.on_expiry or "charge")[0],
        )

    def needed_scopes(self, method: str) -> str:
        """An empty list for a method means "no scope", not "the route's default"."""
        needed = self.scopes_by_method.get(method)
        return self.scopes_by_method.get("*", "") if needed is None else needed

    def meter(self) -> CostMeter | None:
        """A fresh meter of this request's cost; None when the route charges nothing."""
        return None if self.new_meter is None else self.new_meter()
