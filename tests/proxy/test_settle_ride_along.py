"""Settlements ride along with the key's next authorization: a settlement queued in the
same event-loop turn as an authorization of its key goes in that authorize script (applied
before its checks) instead of a settle.lua call of its own; and if that call fails, the
settlement is sent again on its own, so it is never lost."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from gateway.proxy.authorize import Decision
from gateway.proxy.service import Proxy
from gateway.store.names import KeyNames
from gateway.store.record import RateLimitSpec
from tests.conftest import MakeKey
from tests.proxy.conftest import Gateway


def _settle_calls(proxy: Proxy) -> float:
    """How many settle.lua calls the proxy timed, from its metrics text."""
    text = generate_latest(proxy.metrics.registry).decode()
    for line in text.splitlines():
        if line.startswith("keygate_redis_call_duration_seconds_count") and '"settle"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no settle call series in the metrics")


async def test_a_settlement_rides_with_the_next_authorization_of_its_key(
    cost_gateway: Gateway, make_key: MakeKey, redis: object, key_prefix: str
) -> None:
    proxy = cost_gateway.proxy
    issued = await make_key()
    policy = proxy.policies["header"]  # reserves 1.0; the upstream states the cost
    first: Decision = await proxy.authorizer.authorize(issued.secret, policy, "GET")
    assert first.status == "ok" and first.entry
    entries = KeyNames(key_prefix).ledger_entries(issued.record.id)
    total = KeyNames(key_prefix).usage(issued.record.id, "t")
    assert int(await redis.hlen(entries)) == 1  # type: ignore[attr-defined]
    assert int(await redis.get(total)) == 1_000_000  # type: ignore[attr-defined]
    before = _settle_calls(proxy)

    # The first request's settlement (0.3 of its 1.0) and the second authorization, queued
    # in one turn: the settlement goes with the script.
    proxy.settlements.queue(first.settle_keys, first.entry, 300_000, int(policy.lease_ms))
    second: Decision = await proxy.authorizer.authorize(issued.secret, policy, "GET")
    assert second.status == "ok"

    assert not proxy.settlements.pending  # no settle.lua call of its own
    await proxy.settlements.drain()
    assert _settle_calls(proxy) == before
    remaining = await redis.hkeys(entries)  # type: ignore[attr-defined]
    assert [r.decode() if isinstance(r, bytes) else r for r in remaining] == [second.entry]
    assert int(await redis.get(total)) == 1_300_000  # type: ignore[attr-defined]


async def test_riders_of_a_refused_authorization_are_applied_all_the_same(
    cost_gateway: Gateway, make_key: MakeKey, redis: object, key_prefix: str
) -> None:
    """The riders are the key's, whatever this request's outcome (rate limited here)."""
    proxy = cost_gateway.proxy
    issued = await make_key(rate_limit=RateLimitSpec(1, 60))
    policy = proxy.policies["header"]
    first: Decision = await proxy.authorizer.authorize(issued.secret, policy, "GET")
    proxy.settlements.queue(first.settle_keys, first.entry, 0, int(policy.lease_ms))
    second = await proxy.authorizer.authorize(issued.secret, policy, "GET")
    assert second.status == "rate_limited"
    await proxy.settlements.drain()
    entries = KeyNames(key_prefix).ledger_entries(issued.record.id)
    total = KeyNames(key_prefix).usage(issued.record.id, "t")
    assert int(await redis.hlen(entries)) == 0  # type: ignore[attr-defined]
    assert int(await redis.get(total)) == 0  # type: ignore[attr-defined]


async def test_riders_of_a_failed_authorization_are_sent_again(
    cost_gateway: Gateway, make_key: MakeKey, redis: object, key_prefix: str
) -> None:
    """The authorization is cancelled before its script is answered: the riders go again on
    their own (a settlement applied twice changes nothing)."""
    proxy = cost_gateway.proxy
    issued = await make_key()
    policy = proxy.policies["header"]
    first: Decision = await proxy.authorizer.authorize(issued.secret, policy, "GET")
    proxy.settlements.queue(first.settle_keys, first.entry, 400_000, int(policy.lease_ms))
    second = asyncio.ensure_future(proxy.authorizer.authorize(issued.secret, policy, "GET"))
    await asyncio.sleep(0)  # sent, with the riders
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    await proxy.settlements.drain()
    await cost_gateway.mux.late_replies_handled()
    await proxy.settlements.drain()
    entries = KeyNames(key_prefix).ledger_entries(issued.record.id)
    total = KeyNames(key_prefix).usage(issued.record.id, "t")
    # The first settled once (0.4); the cancelled one's reservation handed back.
    assert int(await redis.hlen(entries)) == 0  # type: ignore[attr-defined]
    assert int(await redis.get(total)) == 400_000  # type: ignore[attr-defined]
