"""Key lookup and authorization for the proxy: one coalesced Redis call per request.

The only thing cached in the process is ``sha256 -> key id``, which never changes for a
key's life; everything that can change (revoked, disabled, expired, rotated) is decided in
Redis on every request, so a change is seen by the very next request on every replica.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.policies.chain import authorize_layout
from gateway.policies.layout import EXPIRED as EXPIRED
from gateway.policies.layout import KEY_STATUSES
from gateway.policies.limits import RoutePolicy
from gateway.policies.ratelimit import RateState, state_at
from gateway.policies.spend import BlockedCap as BlockedCap
from gateway.proxy.context import KeyIdentity
from gateway.store.clock import ClockOverride, server_clock
from gateway.store.cluster_multiplex import Multiplexer
from gateway.store.multiplex import LuaScript, reply_text
from gateway.store.names import KeyNames
from gateway.store.scripts import library_source, script_source
from gateway.store.secrets import has_bad_checksum
from gateway.usage.periods import DAY_MS, day_hint

# The authorize script, assembled from the policies at start-up, and where its reply holds
# what the proxy reads (gateway/policies/layout.py computes every position).
LAYOUT = authorize_layout()
AUTHORIZE = LuaScript.from_source(library_source() + "\n" + LAYOUT.script)
SETTLE = LuaScript.from_source(script_source("settle"))
REPORT = LuaScript.from_source(script_source("report"))
ENTRY_ARG = LAYOUT.arg("entry")  # where the authorize arguments hold the ledger entry's id
HELD = LAYOUT.ok["spend_caps.held"]  # where an "ok" reply holds the reservation
WRITTEN = LAYOUT.written  # where an "ok" reply says whether a ledger entry was written (1|0)
_RATE_AT = LAYOUT.notes["rate_limit"].start  # the rate fields, in every reply but a key's
_REFUSERS = LAYOUT.refusers
_KEYED = tuple(p for p in LAYOUT.policies if p.keys)  # policies with Redis names of their own
# A settlement's target: the record, usage prefix, ledger, ledger entries and pending ids
# of its key.
SettleKeys = tuple[str, str, str, str, str]


class Riders(Protocol):
    """Settlements that ride along with an authorization (proxy/settle.py makes them)."""

    triples: list[Any]  # request id, actual cost (micro), usage note, ...


@dataclass(frozen=True, slots=True)
class Decision:
    # ok | not_found | disabled | expired | need_resource | a policy's refusal
    # (gateway/policies/chain.py: forbidden_scope, forbidden_resource, rate_limited,
    # concurrency_limited, spend_limited)
    status: str
    key: KeyIdentity | None = None
    now_ms: int = 0  # the script's clock: settle charges the buckets of this instant
    held_micro: int = 0  # reserved against the caps; settle trues it up
    rate: RateState | None = None
    settle_keys: SettleKeys = ("", "", "", "", "")  # for settle.lua
    # The request's ledger entry ("": none, the route charges nothing and the key has no
    # max_in_flight).
    entry: str = ""
    refused: Any = None  # a refusal: the refusing policy's typed value (its ``decode``)


NOT_FOUND = Decision("not_found")


class HashCache:
    """Bounded LRU of sha256 -> key id, so a flood of random keys cannot grow memory."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str) -> str | None:
        key_id = self._entries.get(digest)
        if key_id is not None:
            self._entries.move_to_end(digest)
        return key_id

    def put(self, digest: str, key_id: str) -> None:
        if self._size <= 0:
            return
        self._entries[digest] = key_id
        self._entries.move_to_end(digest)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


@functools.lru_cache(maxsize=4096)
def _identity(
    key_id: Any,
    workspace_id: Any,
    user_id: Any,
    scopes: Any,
    resources: Any,
    name: Any,
    workspace_capped: Any,
) -> KeyIdentity:
    """The identity in an authorize reply. A key's replies repeat request after request, so
    the JSON is parsed and the object built once per distinct reply (it is immutable)."""
    scope_list = tuple(json.loads(scopes or "[]"))
    return KeyIdentity(
        id=reply_text(key_id),
        workspace_id=reply_text(workspace_id),
        user_id=reply_text(user_id),
        scopes=scope_list,
        resources=None if resources is None else tuple(json.loads(resources)),
        scopes_header=" ".join(scope_list),
        name=None if name is None else reply_text(name),
        workspace_capped=bool(int(workspace_capped)),
    )


class KeyAuthorizer:
    def __init__(
        self,
        redis: Multiplexer,
        names: KeyNames,
        cache_size: int,
        secret_prefix: str,
        clock: ClockOverride = server_clock,
    ) -> None:
        self.redis = redis
        self.names = names
        self.cache = HashCache(cache_size)
        self.secret_prefix = secret_prefix
        self.clock = clock  # '' (the server's TIME) except in tests of period rollover
        # Called with the reply of an authorization whose request was cancelled meanwhile,
        # its key's names and its ledger entry (the proxy settles it at 0); replaced by Proxy.
        self.abandoned: Callable[[list[Any], SettleKeys, str, RoutePolicy], None] = _ignore
        # Given the expired ledger entries a script charged and refunded (metrics);
        # replaced by the settlements.
        self.expired: Callable[[int, int], None] = _none_expired
        # Ledger entry ids: unique per authorization whatever the client sends (a request
        # id from a header could repeat), cheap (a counter), and unique across processes
        # and restarts (a random prefix per authorizer, made in the process that serves).
        self._entry_prefix = secrets.token_hex(8)
        self._entry_ids = itertools.count()
        # Given a key's names: the (request id, actual cost, usage note) triples of its
        # settlements waiting in this turn, taken to ride along with its authorization (or
        # None); and where they go back when that call fails. Replaced by the settlements.
        self.ride_along: Callable[[SettleKeys], Riders | None] = _no_riders
        self.riders_back: Callable[[Riders], None] = _drop_riders
        # Given each authorize script call's duration in seconds (metrics); replaced by Proxy.
        self.timed: Callable[[float], None] = _discard

    async def authorize(
        self,
        secret: str,
        policy: RoutePolicy,
        method: str,
        resource: str | None = None,
        reserve: int | None = None,
        tokens: int | None = None,
    ) -> Decision:
        """Decide for a presented secret on a route: every check and, when all pass, the
        reservation, in one script. ``resource`` is the request's resource when the route
        names one and it has been read ("" when the request names none); None when it has
        not been read, and then a key restricted to resources gets ``need_resource``.
        ``reserve``: this request's own reservation in micro-units (reserve: auto), instead
        of the route's; ``tokens``: its token estimate (an LLM request), for token limits.

        Raises Redis errors (the caller fails closed or open as configured)."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        key_id = self.cache.get(digest)
        if key_id is None and has_bad_checksum(secret, self.secret_prefix):
            # A mistyped or made-up keygate key: refused without asking Redis. A cached
            # hash is a real key's, so the check is skipped on the hot path.
            return NOT_FOUND
        clock = self.clock()
        args = (
            digest,
            clock,
            # The buckets of this process's clock: the script uses them when its own clock
            # falls in the same UTC day, and computes its own otherwise.
            *day_hint(int(clock or time.time() * 1000) // DAY_MS),
            # The ledger entry's id, for a route that charges or a key with max_in_flight
            # (the script decides): settle.lua finds it by this id.
            f"{self._entry_prefix}{next(self._entry_ids):x}",
            *policy.args(method, resource, reserve, tokens),
        )
        if key_id is not None:
            decision = await self._decide(key_id, policy, args)
            if decision is not NOT_FOUND:
                return decision
            # Revoked, or its secret re-imported under a new id: look the hash up afresh.
            self.cache.forget(digest)
        key_id = await self._lookup(digest)
        if key_id is None:
            return NOT_FOUND
        decision = await self._decide(key_id, policy, args)
        if decision is not NOT_FOUND:
            self.cache.put(digest, key_id)
        return decision

    async def report(self, secret: str) -> list[Any] | None:
        """report.lua's reply for the key a presented secret belongs to (the hash checked
        in the script), or None for an unknown secret. Charges nothing, limits nothing."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        key_id = self.cache.get(digest) or await self._lookup(digest)
        if key_id is None:
            return None
        names = self.names
        reply: list[Any] = await self.redis.evalsha(
            REPORT,
            (names.record(key_id), names.usage(key_id, ""), names.rate(key_id)),
            (digest, self.clock()),
        )
        return None if reply_text(reply[0]) == "not_found" else reply

    async def _lookup(self, digest: str) -> str | None:
        found = await self.redis.execute("GET", self.names.by_hash(digest))
        return None if found is None else reply_text(found)

    async def _decide(self, key_id: str, policy: RoutePolicy, args: tuple[Any, ...]) -> Decision:
        names = self.names
        keys = (  # the frame's names: settle.lua's too (policies/layout.py, FRAME_KEYS)
            names.record(key_id),
            names.usage(key_id, ""),
            names.ledger(key_id),
            names.ledger_entries(key_id),
            names.pending_ids(key_id),
        )
        script_keys: tuple[str, ...] = keys
        for keyed in _KEYED:  # the policies' own names, in chain order
            script_keys += keyed.redis_keys(names, key_id, policy.name)
        entry = args[ENTRY_ARG]
        sent_at = time.perf_counter()
        # This turn's settlements of the key, not sent yet, go with the script (applied
        # before its checks) instead of in a settle.lua call of their own.
        riders = self.ride_along(keys)
        try:
            reply = await self.redis.run_script(
                AUTHORIZE,
                script_keys,
                args if riders is None else (*args, *riders.triples),
                # The client left while the script ran: hand back what it reserved.
                lambda late: self.abandoned(late, keys, entry, policy),
            )
        except BaseException:
            # Not run, or its fate unknown: the riders go again on their own (settling
            # twice changes nothing).
            if riders is not None:
                self.riders_back(riders)
            raise
        self.timed(time.perf_counter() - sent_at)
        status = reply_text(reply[0])
        if status == "not_found":
            return NOT_FOUND
        if reply[EXPIRED] or reply[EXPIRED + 1]:
            self.expired(int(reply[EXPIRED]), int(reply[EXPIRED + 1]))
        key = _identity(*reply[2:9])
        now = int(reply[1])
        if status == "ok":
            written = entry if int(reply[WRITTEN]) else ""
            rate = state_at(reply, _RATE_AT)
            return Decision(status, key, now, int(reply[HELD]), rate, keys, written)
        if status in KEY_STATUSES:  # disabled, expired: no policy ran
            return Decision(status, key, now)
        refuser = _REFUSERS[status]
        refused = refuser.policy.decode(status, reply[refuser.notes], reply[refuser.values])
        return Decision(status, key, now, rate=state_at(reply, _RATE_AT), refused=refused)


def _ignore(reply: list[Any], keys: SettleKeys, entry: str, policy: RoutePolicy) -> None:
    return None


def _none_expired(charged: int, refunded: int) -> None:
    return None


def _discard(seconds: float) -> None:
    return None


def _no_riders(keys: SettleKeys) -> Riders | None:
    return None


def _drop_riders(riders: Riders) -> None:
    return None
