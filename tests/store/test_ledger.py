"""The reservation ledger's scripts against a real Redis: a settlement applied twice changes
usage once, and a settlement that arrives after its lease was resolved (charged or
refunded) still ends with the request charged its actual cost, exactly once.

The scripts take a clock override (ms), so a lease ends here without waiting for it."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.proxy.authorize import AUTHORIZE, EXPIRED, LAYOUT, WRITTEN
from gateway.store.names import KeyNames
from gateway.store.scripts import script_source
from tests.conftest import MakeKey

RESERVE = 10_000  # micro-units held at authorization
ACTUAL = 3_000  # what the response said it cost
LEASE_MS = 60_000


class Ledger:
    """authorize.lua and settle.lua for one key, called as the proxy calls them."""

    def __init__(self, redis: Redis, names: KeyNames, key_id: str, digest: str) -> None:
        self.redis, self.names, self.key_id, self.digest = redis, names, key_id, digest
        self._authorize = redis.register_script(AUTHORIZE.source)
        self._settle = redis.register_script(script_source("settle"))

    def _keys(self) -> list[str]:
        n, k = self.names, self.key_id
        return [n.record(k), n.usage(k, ""), n.ledger(k), n.ledger_entries(k)]

    async def authorize(self, now_ms: int, entry: str, on_expiry: str = "c") -> list[Any]:
        args = LAYOUT.pack(
            {
                "digest": self.digest,
                "clock": now_ms,
                "entry": entry,
                "resource.state": "0",
                "lease_ms": LEASE_MS,
                "on_expiry": on_expiry,
                "spend_caps.reserve": RESERVE,
                "spend_caps.byok": "0",
            }
        )
        keys = LAYOUT.key_names(self.names, self.key_id, "r")
        reply: list[Any] = await self._authorize(keys=keys, args=args)
        assert reply[0] in ("ok", b"ok"), reply
        return reply

    async def settle(self, now_ms: int, *pairs: Any) -> list[int]:
        """settle.lua with (request id, actual cost) pairs, each given no usage note."""
        triples = [v for i in range(0, len(pairs), 2) for v in (*pairs[i : i + 2], "")]
        reply = await self._settle(keys=self._keys(), args=[now_ms, *triples])
        return [int(v) for v in reply]

    async def usage(self) -> int:
        return int(await self.redis.get(self.names.usage(self.key_id, "t")) or 0)


@pytest.fixture
async def ledger(redis: Redis, key_prefix: str, make_key: MakeKey) -> Ledger:
    issued = await make_key()
    return Ledger(redis, KeyNames(key_prefix), issued.record.id, issued.record.hash)


async def _now(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_settlement_applied_twice_changes_usage_once(ledger: Ledger, redis: Redis) -> None:
    now = await _now(redis)
    await ledger.authorize(now, "req-1")
    assert await ledger.usage() == RESERVE
    # settled, late, already settled, expired charged, expired refunded
    assert await ledger.settle(now + 5, "req-1", ACTUAL) == [1, 0, 0, 0, 0]
    assert await ledger.usage() == ACTUAL
    assert await ledger.settle(now + 6, "req-1", ACTUAL) == [0, 0, 1, 0, 0]
    assert await ledger.usage() == ACTUAL
    # The same id twice in one call counts once, too.
    await ledger.authorize(now + 7, "req-2")
    assert await ledger.settle(now + 8, "req-2", ACTUAL, "req-2", ACTUAL) == [1, 0, 1, 0, 0]
    assert await ledger.usage() == 2 * ACTUAL


@pytest.mark.parametrize(("rule", "resolved"), [("c", RESERVE), ("r", 0)])
async def test_a_settlement_after_its_lease_was_resolved_lands_once(
    ledger: Ledger, redis: Redis, rule: str, resolved: int
) -> None:
    now = await _now(redis)
    await ledger.authorize(now, "req-1", on_expiry=rule)
    assert await ledger.usage() == RESERVE
    # The lease ends unsettled: the next script on the key resolves the entry.
    after = now + LEASE_MS + 1
    reply = await ledger.authorize(after, "req-2")
    assert [int(reply[EXPIRED]), int(reply[EXPIRED + 1])] == ([1, 0] if rule == "c" else [0, 1])
    assert await ledger.usage() == resolved + RESERVE
    # req-1's settlement arrives late: its charge becomes its actual cost, once.
    late = [0, 1, 0, 0, 0]
    assert await ledger.settle(after + 1, "req-1", ACTUAL) == late
    assert await ledger.usage() == ACTUAL + RESERVE
    assert await ledger.settle(after + 2, "req-1", ACTUAL) == [0, 0, 1, 0, 0]
    assert await ledger.settle(after + 3, "req-2", ACTUAL) == [1, 0, 0, 0, 0]
    assert await ledger.usage() == 2 * ACTUAL


async def test_resolved_entries_are_forgotten_a_day_later(ledger: Ledger, redis: Redis) -> None:
    now = await _now(redis)
    await ledger.authorize(now, "req-1")
    assert await ledger.settle(now + LEASE_MS + 1) == [0, 0, 0, 1, 0]
    entries = ledger.names.ledger_entries(ledger.key_id)
    assert await redis.hlen(entries) == 1  # kept for a late settlement
    assert await ledger.settle(now + LEASE_MS + 86_400_000 + 2) == [0, 0, 0, 0, 0]
    assert await redis.hlen(entries) == 0
    assert await redis.zcard(ledger.names.ledger(ledger.key_id)) == 0
    assert await ledger.usage() == RESERVE  # charged at its lease end, and that stays


async def test_max_in_flight_counts_pending_entries_with_their_lease_running(
    redis: Redis, key_prefix: str, make_key: MakeKey
) -> None:
    """authorize.lua with the pending ids and a key allowed 2 in flight, on a
    route that charges nothing: each admitted request holds an entry; a third is refused
    while two are pending; a settlement frees a slot; an entry whose lease ended (resolved,
    kept a day for a late settlement) holds none."""
    issued = await make_key(max_in_flight=2)
    names, key_id = KeyNames(key_prefix), issued.record.id
    authorize = redis.register_script(AUTHORIZE.source)
    settle = redis.register_script(script_source("settle"))
    keys = LAYOUT.key_names(names, key_id, "r")
    settle_keys = keys[:5]  # the frame's names are settle.lua's

    async def admit(now_ms: int, entry: str) -> str:
        args = LAYOUT.pack(
            {
                "digest": issued.record.hash,
                "clock": now_ms,
                "entry": entry,
                "resource.state": "0",
                "lease_ms": LEASE_MS,
                "on_expiry": "c",
                "spend_caps.byok": "0",
            }
        )
        reply = await authorize(keys=keys, args=args)
        status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if status == "ok":
            assert int(reply[WRITTEN]) == 1  # an entry was written, amount 0
        return str(status)

    now = await _now(redis)
    assert [await admit(now, "a"), await admit(now + 1, "b")] == ["ok", "ok"]
    assert await admit(now + 2, "c") == "concurrency_limited"
    assert await settle(keys=settle_keys, args=[now + 3, "a", 0, ""])
    assert await admit(now + 4, "d") == "ok"
    assert await admit(now + 5, "e") == "concurrency_limited"
    # b's and d's leases end unsettled: resolved (a tombstone each), no slot held.
    later = now + 4 + LEASE_MS + 1
    assert [await admit(later, "f"), await admit(later + 1, "g")] == ["ok", "ok"]
    assert await admit(later + 2, "h") == "concurrency_limited"
    assert await redis.zcard(names.pending_ids(key_id)) == 2
    assert await ledger_usage(redis, names, key_id) == 0  # nothing was ever charged


async def ledger_usage(redis: Redis, names: KeyNames, key_id: str) -> int:
    return int(await redis.get(names.usage(key_id, "t")) or 0)
