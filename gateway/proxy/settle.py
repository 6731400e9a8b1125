"""Settling a request's cost after its response (DESIGN §3 step 6).

The authorize script held the route's reservation; here the actual cost replaces it:
the upstream's cost when the response tells, the reservation when it does not, and
nothing when the upstream failed (connect error, timeout or reset before an answer, a
5xx, or the client gone before the first byte) unless the route says ``charge_failed``.
A settlement outlives its request (a client that leaves does not cancel it), and
``drain`` waits for every one on shutdown, so nothing is lost or written twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from gateway.proxy.context import RequestContext

if TYPE_CHECKING:
    from gateway.proxy.authorize import Decision, KeyAuthorizer
    from gateway.proxy.cost import CostMeter

log = logging.getLogger("keygate.proxy")
_ATTEMPTS = 3


def charge(ctx: RequestContext, decision: Decision, meter: CostMeter | None) -> int:
    """What this request costs, in micro-units."""
    assert ctx.policy is not None
    status = ctx.upstream_status
    failed = status is None or status >= 500 or not ctx.responded
    if failed and not ctx.policy.charge_failed:
        return 0
    if meter is None:
        return 0
    cost = meter.result()
    if cost is None:
        if status is not None:
            log.warning(
                "route %s: cost not read from the response (%s); charged the reservation",
                ctx.policy.name,
                meter.problem or "no value",
            )
        return decision.held_micro
    return cost


class Settlements:
    """The settlements in flight, written through the same coalescing multiplexer."""

    def __init__(self, authorizer: KeyAuthorizer) -> None:
        self.authorizer = authorizer
        self.pending: set[asyncio.Task[None]] = set()
        self.failed = 0  # settlements given up after retries (metrics, issue 6)

    async def settle(
        self, ctx: RequestContext, decision: Decision, meter: CostMeter | None
    ) -> None:
        delta = charge(ctx, decision, meter) - decision.held_micro
        if delta == 0:  # the reservation was exact (a fixed cost): nothing to write
            return
        assert ctx.policy is not None
        task = asyncio.create_task(self._write(ctx, decision, delta))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        await asyncio.shield(task)

    async def _write(self, ctx: RequestContext, decision: Decision, delta: int) -> None:
        assert ctx.policy is not None
        for attempt in range(_ATTEMPTS):
            try:
                await self.authorizer.settle(decision, ctx.policy, delta)
                return
            except (RedisError, OSError) as exc:
                if attempt + 1 == _ATTEMPTS:
                    self.failed += 1
                    log.error(
                        "settlement of %d micro-units for key %s lost: %s",
                        delta,
                        decision.key.id if decision.key else "?",
                        type(exc).__name__,
                    )
                    return
                await asyncio.sleep(0.05 * 2**attempt)

    async def drain(self) -> None:
        """Wait for every settlement in flight (graceful shutdown)."""
        while self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
