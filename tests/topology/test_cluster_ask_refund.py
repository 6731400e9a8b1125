"""An authorization sent on a Cluster's ASK redirection whose client left while it ran is
refunded, as on the direct path: the late reply reaches the proxy's refund handler.

On the session's 3-primary ``cluster``; the key's slot is half migrated (every key already
on the target, the slot still the source's), so the source answers ASK and the target
runs the authorize script after ASKING.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.store.keystore import KeyStore
from gateway.store.slots import key_slot
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway
from tests.topologies import ClusterTopology

pytestmark = pytest.mark.timeout(120)

StartCostGateway = Callable[..., Awaitable[Gateway]]
RESERVE_MICRO = 1_000_000  # /c/header's reserve


@pytest.fixture
def redis_url(cluster: ClusterTopology) -> str:
    return cluster.url


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_an_authorization_abandoned_on_an_ask_redirection_is_refunded(
    cluster: ClusterTopology,
    start_cost_gateway: StartCostGateway,
    make_key: MakeKey,
    store: KeyStore,
    redis: RedisCluster,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_cost_gateway()
    issued = await make_key()
    key_id, names = issued.record.id, store.names
    path = f"{gateway.url}/c/header"
    async with http.get(f"{path}?cost=0", headers=bearer(issued.secret)) as response:
        assert response.status == 200  # the slot map and the key's id are known now
    await gateway.proxy.settlements.drain()
    # An importing node runs a script after ASKING only if every key the script names is
    # there (else TRYAGAIN, until the slot has moved). keygate never writes the usage
    # prefix itself, nor rate states for a key and route without limits: made here so the
    # target can run the authorize script mid-migration.
    for name in (names.usage(key_id, ""), names.rate(key_id), f"{names.rate(key_id)}:header"):
        await redis.set(name, "0")
    # Nor, with nothing in flight, the key's reservation ledger.
    await redis.zadd(names.ledger(key_id), {"placeholder": 2**52})
    await redis.hset(names.ledger_entries(key_id), "placeholder", "")
    # And its pending ids (max_in_flight's count; this key has no limit, so none is held).
    await redis.zadd(names.pending_ids(key_id), {"placeholder": 2**52})

    slot = key_slot(names.record(key_id))
    home = cluster.owner_of_slot(slot)
    away = next(a for a in cluster.seeds if a != home)
    cluster.begin_migration(slot, away)
    try:
        with cluster.client(home) as source:
            keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        cluster.move_keys([_text(k) for k in keys])
        # The target holds writes back for 0.4 s: the script is sent (after ASKING), not
        # yet run, when the client gives up.
        with cluster.client(away) as target:
            target.execute_command("CLIENT", "PAUSE", 400, "WRITE")
        with contextlib.suppress(TimeoutError):
            async with http.get(
                f"{path}?cost=0.5",
                headers=bearer(issued.secret),
                timeout=aiohttp.ClientTimeout(total=0.15),
            ) as response:
                await response.read()
        await asyncio.sleep(0.7)  # the pause ends, the script runs, its late reply arrives
        await gateway.mux.late_replies_handled()
        await gateway.proxy.settlements.drain()
    finally:
        cluster.finish_migration(slot, away)  # whatever happened: the slot whole again
        cluster.migrate_slot(slot, home)

    assert await redis.hget(names.record(key_id), "total_uses") == "2"  # the abandoned one ran
    assert int(await redis.get(names.usage(key_id, "t")) or 0) == 0  # and was refunded
    assert gateway.proxy.settlements.failed == 0
