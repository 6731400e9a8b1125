"""A Cluster primary dies: its keys get 503 + Retry-After until its replica is promoted,
then they are served again by the same gateway. The other primaries' keys are served
throughout, except while the cluster itself reports CLUSTERDOWN (with Redis's default
cluster-require-full-coverage, from the moment the node is marked failed until its replica
takes over): then they get 503 too, never a wrong answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.config.model import Settings
from gateway.store.connection import StoreClient, connect
from gateway.store.keystore import KeyStore
from gateway.store.slots import key_slot
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import StartGateway, assert_problem
from tests.topologies import ClusterTopology, start_cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[ClusterTopology]:
    with start_cluster(tmp_path / "cluster", primaries=3, replicas_per_primary=1) as cluster:
        yield cluster


@pytest.fixture
def redis_url(replicated_cluster: ClusterTopology) -> str:
    return replicated_cluster.url


@pytest.fixture
async def redis(settings: Settings, redis_url: str) -> AsyncIterator[StoreClient]:
    """The store's client, without the usual clean-up: this cluster is thrown away."""
    client = connect(settings.redis, redis_url)
    yield client
    await client.aclose()


async def test_a_dead_primarys_keys_are_503_until_its_replica_takes_over(
    replicated_cluster: ClusterTopology,
    start_gateway: StartGateway,
    make_key: MakeKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    cluster = replicated_cluster
    gateway = await start_gateway(redis={"connect_timeout": 0.3, "socket_timeout": 0.5})
    made = [await make_key(scopes=["echo:read"]) for _ in range(12)]
    home = {
        k.record.id: cluster.owner_of_slot(key_slot(store.names.record(k.record.id)))
        for k in made
    }
    victim = home[made[0].record.id]
    doomed = [k for k in made if home[k.record.id] == victim]
    spared = [k for k in made if home[k.record.id] != victim]
    assert doomed and spared

    async def status(secret: str | None) -> int:
        async with http.get(f"{gateway.url}/echo/x", headers=bearer(secret)) as r:
            if r.status == 503:
                await assert_problem(r, 503, "store_error")
                assert int(r.headers["Retry-After"]) >= 1
            return r.status

    assert {await status(k.secret) for k in made} == {200}
    cluster.node(victim).kill()

    seen_503 = False
    deadline = time.monotonic() + 60
    while True:
        statuses = {await status(k.secret) for k in spared}
        doomed_statuses = {await status(k.secret) for k in doomed}
        assert statuses | doomed_statuses <= {200, 503}  # never a wrong answer
        seen_503 |= 503 in doomed_statuses
        if statuses | doomed_statuses == {200} and seen_503:
            break
        assert time.monotonic() < deadline, "the replica was never promoted"
        await asyncio.sleep(0.2)
    # The gateway saw the outage, then recovered without a restart: the replica serves.
    assert cluster.owner_of_slot(key_slot(store.names.record(doomed[0].record.id))) != victim
    for issued in made:  # every request that got 200 was counted, on the new primary too
        record = await store.get(issued.record.id)
        assert record is not None and record.total_uses >= 2
