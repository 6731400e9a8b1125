"""Settling a request's cost after its response (docs/architecture.md).

The authorize script held the route's reservation; here the actual cost replaces it:
the upstream's cost when the response tells, the reservation when it does not, and
nothing when the upstream failed (connect error, timeout or reset before an answer, a
5xx, or the client gone before the first byte) unless the route says ``charge_failed``.

A settlement is queued into the multiplexer's batch of the current event-loop turn, with
no task and no await in the request's path: the same coalescing as the authorization. It
outlives its request (a client that leaves does not cancel it), is retried on a store
error, and ``drain`` waits for every one on shutdown, so nothing is lost or written twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from gateway.proxy.authorize import HELD, SETTLE
from gateway.proxy.context import RequestContext
from gateway.store.connection import STORE_ERRORS
from gateway.store.multiplex import reply_text
from gateway.usage.periods import DAY_MS, day_hint

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.policies.cost import CostMeter
    from gateway.policies.limits import RoutePolicy
    from gateway.proxy.authorize import Decision, KeyAuthorizer

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
    """Settlements: summed per key, UTC day and BYOK flag within one event-loop turn, then
    sent in the multiplexer's batch; the reply futures in flight; retries after a failure.

    A hot key's many responses in one turn become one script call with their summed
    delta: exact (a sum of integers), and the same buckets, since every instant of one UTC
    day falls in the same day, week and month.
    """

    def __init__(self, authorizer: KeyAuthorizer, metrics: Metrics) -> None:
        self.authorizer = authorizer
        self.metrics = metrics
        # reply -> (command, when it was sent; None for a retry, whose latency is not Redis')
        self.pending: dict[asyncio.Future[Any], tuple[tuple[Any, ...], float | None]] = {}
        self.failed = 0  # settlements given up after retries
        # (record key, usage prefix, UTC day, byok) -> [an instant of that day, delta]
        self._turn: dict[tuple[str, str, int, str], list[int]] = {}
        self._flush_handle: asyncio.Handle | None = None

    def settle(self, ctx: RequestContext, decision: Decision, meter: CostMeter | None) -> int:
        """Queue this request's settlement (nothing when the reservation was exact); what
        the request cost, in micro-units."""
        charged = charge(ctx, decision, meter)
        delta = charged - decision.held_micro
        if delta == 0:  # a fixed cost, reserved exactly: nothing to write
            return charged
        assert ctx.policy is not None
        record, usage = decision.settle_keys
        self._add(record, usage, decision.now_ms, ctx.policy.byok, delta)
        return charged

    def release(self, reply: list[Any], keys: tuple[str, str], policy: RoutePolicy) -> None:
        """Refund what an authorization reserved for a request that was gone before it
        could be forwarded (its client left while the script ran). ``reply`` is the
        authorize script's, as the multiplexer gives it (text as str or bytes)."""
        if reply_text(reply[0]) == "ok" and int(reply[HELD]) != 0:
            self._add(keys[0], keys[1], int(reply[1]), policy.byok, -int(reply[HELD]))

    def _add(self, record: str, usage: str, now_ms: int, byok: str, delta: int) -> None:
        key = (record, usage, now_ms // DAY_MS, byok)
        entry = self._turn.get(key)
        if entry is None:
            self._turn[key] = [now_ms, delta]
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        else:
            entry[1] += delta

    def _flush(self) -> None:
        self._flush_handle = None
        turn, self._turn = self._turn, {}
        redis = self.authorizer.redis
        for (record, usage, _, byok), (now_ms, delta) in turn.items():
            if delta == 0:
                continue
            hint = day_hint(now_ms // DAY_MS)  # exact: the authorize script's own instant
            call = ("EVALSHA", SETTLE.sha, 2, record, usage, now_ms, byok, delta, *hint)
            reply = redis.submit(*call)
            if reply is None:  # no connection open: a task connects first
                reply = asyncio.ensure_future(self._send(call))
            self.pending[reply] = (call, time.perf_counter())
            reply.add_done_callback(self._done)

    def _done(self, reply: asyncio.Future[Any]) -> None:
        call, sent_at = self.pending.pop(reply)
        if reply.cancelled():
            return
        if reply.exception() is None:
            if sent_at is not None:
                self.metrics.settle_duration.observe(time.perf_counter() - sent_at)
            return
        self.metrics.redis_errors.labels("settle").inc()
        error = reply.exception()
        if isinstance(error, NoScriptError):  # not run: the server lost its scripts
            retry = asyncio.ensure_future(self._send(call))
            self.pending[retry] = (call, None)
            retry.add_done_callback(self._done)
        else:
            self._lost(call, error)

    async def _send(self, call: tuple[Any, ...]) -> None:
        """Send a settlement that was not run. Retries only while nothing can have run:
        a settlement whose fate is unknown (connection lost after sending) is never sent
        again, so no cost is ever counted twice."""
        redis = self.authorizer.redis
        error: BaseException | None = None
        for attempt in range(_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.05 * 2**attempt)
            try:
                await redis.connect()
            except STORE_ERRORS as exc:
                error = exc
                continue  # nothing was sent
            try:
                await redis.evalsha(SETTLE, call[3 : 3 + call[2]], call[3 + call[2] :])
                return
            except STORE_ERRORS as exc:
                error = exc
                break
        self._lost(call, error)

    def _lost(self, call: tuple[Any, ...], error: BaseException | None) -> None:
        self.failed += 1
        self.metrics.settlements_lost.inc()
        log.error(
            "settlement of %s micro-units for %s lost: %s",
            call[7],
            call[3],
            type(error).__name__,
        )

    async def drain(self) -> None:
        """Wait for every settlement in flight (graceful shutdown, tests)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)
