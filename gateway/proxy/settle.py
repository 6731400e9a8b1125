"""Settling a request's cost after its response (docs/architecture.md).

The authorize script held the route's reservation and wrote the request's ledger entry;
here the actual cost replaces it: the upstream's cost when the response tells, the
reservation when it does not, and nothing when the upstream failed (connect error, timeout
or reset before an answer, a 5xx, or the client gone before the first byte) unless the
route says ``charge_failed``.

A settlement names its ledger entry, so applying it twice changes nothing (settle.lua).
That is what lets a settlement whose fate is unknown (the connection dropped after it was
sent) be sent again: it is retried through a Redis outage until its lease has ended (plus
a margin); after that the ledger has resolved the reservation (reservations.on_expiry),
and a settlement that still lands makes the charge the actual cost, once.

A settlement also carries its request's token usage as a note (``usage_note``): settle.lua
adds it to the usage per model of the entry's key (or workspace) when it removes the entry,
so once too, a late settlement included.

A settlement is queued into the multiplexer's batch of the current event-loop turn, with
no task and no await in the request's path: the same coalescing as the authorization. The
settlements of one key within one turn go in one script call. It outlives its request (a
client that leaves does not cancel it), and ``drain`` waits for every one on shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import NoScriptError

from gateway.policies.llm_usage import TokenUsage
from gateway.proxy.authorize import EXPIRED, SETTLE, WRITTEN, Riders, SettleKeys
from gateway.proxy.context import RequestContext
from gateway.store.connection import STORE_ERRORS
from gateway.store.multiplex import reply_text

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.policies.cost import CostMeter
    from gateway.policies.limits import RoutePolicy
    from gateway.proxy.authorize import Decision, KeyAuthorizer

log = logging.getLogger("keygate.proxy")
# How long past its lease end a settlement is still retried: the lease is measured by the
# Redis server's clock, the deadline by this host's, and a little skew must not cut it short.
RETRY_MARGIN_S = 30.0
# Once shutdown has begun, how long a settlement is retried at most: a stop must not wait
# out a lease; what is not written by then, the ledger resolves at the lease end.
DRAIN_RETRY_S = 5.0
_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
_PER_CALL = 200  # settlements per script call at most (a script's argument list is bounded)
_STRIDE = 3  # a settlement's arguments: ledger entry id, actual cost (micro), usage note
# A model's name in a usage note at most (bytes of UTF-8): names are short; a longer one is
# an upstream's mistake and must not grow the usage per model without bound.
MAX_MODEL_BYTES = 128
# The model of a usage that names none.
UNNAMED_MODEL = "unknown"


def usage_note(usage: TokenUsage | None) -> str:
    """What a settlement says of its request's token usage (lib.lua's apply_settlements):
    "" for none (a route that is not an LLM API's, or an answer that told no usage), else
    ``"<model>\t<input tokens>\t<output tokens>"``. The model's name is made to parse:
    control characters (tab, newline) become spaces, it is clipped to MAX_MODEL_BYTES bytes
    of UTF-8 (whole characters), and an empty name is UNNAMED_MODEL."""
    if usage is None:
        return ""
    return f"{_model_name(usage.model)}\t{max(0, usage.input)}\t{max(0, usage.output)}"


@functools.lru_cache(maxsize=1024)  # a gateway sees a few models, again and again
def _model_name(model: str) -> str:
    cleaned = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in model)
    clipped = cleaned.encode()[:MAX_MODEL_BYTES].decode(errors="ignore").strip()
    return clipped or UNNAMED_MODEL


def charge(ctx: RequestContext, decision: Decision, meter: CostMeter | None) -> int:
    """What this request costs, in micro-units."""
    assert ctx.policy is not None
    status = ctx.upstream_status
    failed = status is None or status >= 500 or not ctx.responded
    if failed and not ctx.policy.charge_failed:
        return 0
    if meter is None:
        return 0
    cost = meter.result()  # sets meter.usage: read by Settlements.settle, not computed again
    if cost is None:
        if status is not None:
            log.warning(
                "route %s: cost not read from the response (%s); charged the reservation",
                ctx.policy.name,
                meter.problem or "no value",
            )
        return decision.held_micro
    if meter.usage is not None and meter.usage.estimated:
        # Counted from a cut stream's text: an estimate is never more than the reservation.
        return min(cost, decision.held_micro)
    return cost


@dataclass(slots=True)
class _Call:
    """One settle.lua call: a key's settlements of one loop turn."""

    keys: SettleKeys
    triples: list[Any]  # request id, actual cost (micro), usage note, ...
    deadline: float  # time.time() after which a failed call is given up
    sent_at: float | None = None  # perf_counter when first sent (None: a retry's)

    def args(self, clock: str) -> tuple[Any, ...]:
        return (clock, *self.triples)

    def command(self, clock: str) -> tuple[Any, ...]:
        return ("EVALSHA", SETTLE.sha, len(self.keys), *self.keys, *self.args(clock))


class Settlements:
    """Settlements: grouped per key within one event-loop turn, then sent in the
    multiplexer's batch; the calls in flight; retries after a failure."""

    def __init__(self, authorizer: KeyAuthorizer, metrics: Metrics) -> None:
        self.authorizer = authorizer
        self.metrics = metrics
        authorizer.expired = self._expired
        authorizer.ride_along = self._ride_along
        authorizer.riders_back = self._riders_back
        self.pending: dict[asyncio.Future[Any], _Call] = {}
        self.failed = 0  # settlements given up after retries
        self._turn: dict[SettleKeys, _Call] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._draining_since: float | None = None

    def settle(self, ctx: RequestContext, decision: Decision, meter: CostMeter | None) -> int:
        """Queue this request's settlement (every request with a ledger entry has one, an
        exact reservation included: it removes the entry); what the request cost, in
        micro-units. The settlement carries the token usage ``meter`` read (``usage_note``)."""
        charged = charge(ctx, decision, meter)
        note = "" if meter is None else usage_note(meter.usage)
        if decision.entry:
            assert ctx.policy is not None  # charge() asserts it too
            lease = int(ctx.policy.lease_ms)
            self.queue(decision.settle_keys, decision.entry, charged, lease, note)
        if ctx.workspace is not None:  # the same actual cost on the workspace's entry, once
            assert ctx.policy is not None
            hold = ctx.workspace
            self.queue(hold.keys, hold.entry, charged, int(ctx.policy.lease_ms), note)
        return charged

    def release(
        self, reply: list[Any] | None, keys: SettleKeys, entry: str, policy: RoutePolicy
    ) -> None:
        """Settle at 0 what an authorization reserved for a request that was gone before it
        could be forwarded (its client left while the script ran), and free its slot of
        max_in_flight. ``reply`` is the authorize script's, as the multiplexer gives it
        (text as str or bytes); it says whether the entry was written. None: the script was
        sent and its reply lost with the connection, so it may have run: the entry is
        settled at 0 all the same (a no-op if it was never written), since its request was
        refused (503) or let through uncharged (fail_open)."""
        if reply is None:
            if entry:
                self.queue(keys, entry, 0, int(policy.lease_ms))
            return
        if entry and reply_text(reply[0]) == "ok" and int(reply[WRITTEN]):
            if int(reply[EXPIRED]) or int(reply[EXPIRED + 1]):  # expired entries it resolved
                self._expired(int(reply[EXPIRED]), int(reply[EXPIRED + 1]))
            self.queue(keys, entry, 0, int(policy.lease_ms))

    def _expired(self, charged: int, refunded: int) -> None:
        if charged:
            self.metrics.reservations_expired.labels("charge").inc(charged)
        if refunded:
            self.metrics.reservations_expired.labels("refund").inc(refunded)

    def queue(
        self, keys: SettleKeys, entry: str, actual: int, lease_ms: int, usage: str = ""
    ) -> None:
        """Settle ledger entry ``entry`` of ``keys`` (a key's, or a workspace's) at
        ``actual`` micro-units, with ``usage`` (a ``usage_note``; "" for none) added to the
        usage per model: batched with the turn's other settlements of the same keys,
        retried until ``lease_ms`` after now (plus a margin) if its fate is unknown."""
        # The lease is counted from the authorization, by the Redis server's clock (or a
        # test's); from now by this host's is later, never earlier.
        deadline = time.time() + lease_ms / 1000 + RETRY_MARGIN_S
        call = self._turn.get(keys)
        if call is None or len(call.triples) >= _STRIDE * _PER_CALL:
            if call is not None:  # full: sent now, a new one for the rest of the turn
                self._send(call)
            self._turn[keys] = _Call(keys, [entry, actual, usage], deadline)
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        else:
            call.triples += (entry, actual, usage)
            call.deadline = max(call.deadline, deadline)

    def _ride_along(self, keys: SettleKeys) -> _Call | None:
        """This turn's settlements of the key ``keys`` names, taken out of the turn's
        batch: they go with the key's authorization, which is sent in this same turn (so
        before any settle.lua call the turn would send, and in the same order)."""
        return self._turn.pop(keys, None)

    def _riders_back(self, riders: Riders) -> None:
        """Settlements whose authorization failed or whose fate is unknown: sent again on
        their own, retried as any settlement (applying them twice changes nothing)."""
        call = cast(_Call, riders)
        call.sent_at = None
        retry = asyncio.ensure_future(self._retry(call, None))
        self.pending[retry] = call
        retry.add_done_callback(self._done)

    def _flush(self) -> None:
        self._flush_handle = None
        turn, self._turn = self._turn, {}
        for call in turn.values():
            self._send(call)

    def _send(self, call: _Call) -> None:
        call.sent_at = time.perf_counter()
        reply = self.authorizer.redis.submit(*call.command(self.authorizer.clock()))
        if reply is None:  # no connection open: a task connects first
            call.sent_at = None
            reply = asyncio.ensure_future(self._retry(call, None))
        self.pending[reply] = call
        reply.add_done_callback(self._done)

    def _done(self, reply: asyncio.Future[Any]) -> None:
        call = self.pending.pop(reply)
        if reply.cancelled():
            return
        error = reply.exception()
        if error is None:
            if call.sent_at is not None:
                self.metrics.settle_duration.observe(time.perf_counter() - call.sent_at)
            self._counted(reply.result())
            return
        # Not run (NOSCRIPT, no connection), or its fate is unknown (connection lost after
        # sending): settle.lua applies a settlement once however often it is sent.
        self.metrics.redis_errors.labels("settle").inc()
        not_run = isinstance(error, NoScriptError)  # sent again at once, with its source
        retry = asyncio.ensure_future(self._retry(call, None if not_run else error))
        self.pending[retry] = call
        retry.add_done_callback(self._done)

    def _counted(self, result: Any) -> None:
        if isinstance(result, list) and len(result) == 5:
            self._expired(int(result[3]), int(result[4]))

    async def _retry(self, call: _Call, error: BaseException | None) -> None:
        """Send ``call`` until it is written, backing off, or give it up (counted as lost)
        once its lease has ended plus a margin, or DRAIN_RETRY_S into a shutdown."""
        redis = self.authorizer.redis
        call.sent_at = None
        for attempt in itertools.count():
            if error is not None:
                if not self._may_retry(call):
                    break
                await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            try:
                await redis.connect()
                result = await redis.evalsha(SETTLE, call.keys, call.args(self.authorizer.clock()))
            except STORE_ERRORS as exc:
                error = exc
                continue
            self._counted(result)
            return
        self._lost(call, error)

    def _may_retry(self, call: _Call) -> bool:
        now = time.time()
        if now > call.deadline:
            return False
        draining = self._draining_since
        return draining is None or time.monotonic() - draining < DRAIN_RETRY_S

    def _lost(self, call: _Call, error: BaseException | None) -> None:
        count = len(call.triples) // _STRIDE
        self.failed += count
        self.metrics.settlements_lost.inc(count)
        log.error(
            "settlement of %d request(s) for %s given up, left to the ledger's expiry: %s",
            count,
            call.keys[0],
            type(error).__name__,
        )

    async def drain(self) -> None:
        """Wait for every settlement in flight (graceful shutdown, tests); retries of failed
        ones are bounded by DRAIN_RETRY_S from here."""
        if self._draining_since is None:
            self._draining_since = time.monotonic()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        try:
            while self.pending:
                await asyncio.gather(*list(self.pending), return_exceptions=True)
        finally:
            self._draining_since = None
