"""keygate on a 3-primary Redis Cluster started from the packaged binary.

The key store (redis-py's cluster client) and the proxy (one multiplexed connection per
primary, routed by slot) keep every key's data in one slot, spread keys over all primaries,
list across slots, and follow the cluster when a key's slot moves (MOVED, and ASK while it
is half moved). The whole suite also runs on a cluster with KEYGATE_TEST_REDIS=cluster.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster

from gateway.store.keystore import KeyStore
from gateway.store.record import RateLimitSpec
from gateway.store.slots import key_slot
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, StartGateway, assert_problem
from tests.topologies import ClusterTopology

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis_url(cluster: ClusterTopology) -> str:
    """Everything in this module (store, admin API, gateways) uses the cluster."""
    return cluster.url


def slot_keys(store: KeyStore, key_id: str, secret_hash: str) -> list[str]:
    names = store.names
    return [names.record(key_id), names.by_hash(secret_hash), names.usage(key_id, "t")]


async def test_keys_spread_over_every_primary_each_in_one_slot_and_list_in_order(
    cluster: ClusterTopology, store: KeyStore, make_key: MakeKey, redis: RedisCluster
) -> None:
    assert isinstance(redis, RedisCluster)
    made = [await make_key(workspace_id="ws-c", name=f"k{i}") for i in range(24)]
    owners = set()
    for issued in made:
        slots = {key_slot(k) for k in slot_keys(store, issued.record.id, issued.record.hash)}
        assert len(slots) == 1
        owners.add(cluster.owner_of_slot(slots.pop()))
    assert owners == set(cluster.seeds)  # all three primaries hold keys

    listed: list[str] = []
    cursor = None
    while True:
        page = await store.list(workspace_id="ws-c", limit=7, cursor=cursor)
        listed += [r.name or "" for r in page.records]
        cursor = page.next_cursor
        if cursor is None:
            break
    # Creation order (ids break ties within a millisecond), across slots and primaries.
    in_order = sorted(made, key=lambda i: i.record.index_member())
    assert listed == [i.record.name for i in in_order]
    reports = await store.reports([i.record.id for i in made])
    assert set(reports) == {i.record.id for i in made}
    assert await store.counts_by_workspace() == {"ws-c": 24}


async def test_admin_api_lifecycle_on_the_cluster(
    admin_client: TestClient[Any, Any], make_key: MakeKey, store: KeyStore
) -> None:
    admin = await make_key(scopes=["*"], name="admin")
    headers = bearer(admin.secret)
    created = await admin_client.post(
        "/v1/keys", json={"name": "svc", "scopes": ["echo:read"]}, headers=headers
    )
    assert created.status == 201, await created.text()
    body = await created.json()
    key_id, secret = body["id"], body["key"]
    imported = await admin_client.post(
        "/v1/keys/import", json={"key": "legacy-secret-0001", "name": "old"}, headers=headers
    )
    assert imported.status == 201, await imported.text()
    clash = await admin_client.post(
        "/v1/keys/import", json={"key": "legacy-secret-0001"}, headers=headers
    )
    assert clash.status == 409
    rotated = await admin_client.post(
        f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 60}, headers=headers
    )
    assert rotated.status == 200, await rotated.text()
    new_secret = (await rotated.json())["key"]
    assert (await store.authenticate(new_secret)).status == "ok"
    assert (await store.authenticate(secret)).status == "ok"  # within the grace period
    updated = await admin_client.patch(
        f"/v1/keys/{key_id}", json={"disabled": True}, headers=headers
    )
    assert updated.status == 200 and (await updated.json())["status"] == "disabled"
    listing = await admin_client.get("/v1/keys?include_disabled=true", headers=headers)
    names = [k["name"] for k in (await listing.json())["data"]]
    assert sorted(names) == ["admin", "old", "svc"]
    revoked = await admin_client.delete(f"/v1/keys/{key_id}", headers=headers)
    assert revoked.status == 204
    assert (await store.authenticate(new_secret)).status == "not_found"
    assert (await store.authenticate(secret)).status == "not_found"
    listing = await admin_client.get("/v1/keys?include_disabled=true", headers=headers)
    assert sorted(k["name"] for k in (await listing.json())["data"]) == ["admin", "old"]


async def test_proxy_authorizes_limits_and_lists_keys_on_every_primary(
    cluster: ClusterTopology,
    start_gateway: StartGateway,
    make_key: MakeKey,
    store: KeyStore,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway(dialects={"konpro": {"enabled": True}})
    keys = [await make_key(scopes=["echo:read"], name=f"p{i}") for i in range(9)]
    nodes = {cluster.owner_of_slot(key_slot(store.names.record(k.record.id))) for k in keys}
    assert len(nodes) >= 2
    for issued in keys:
        async with http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret)) as r:
            assert r.status == 200
    async with http.get(f"{gateway.url}/echo/x", headers=bearer("kg_nope")) as r:
        await assert_problem(r, 401, "invalid_key")
    async with http.post(f"{gateway.url}/echo/x", headers=bearer(keys[0].secret)) as r:
        await assert_problem(r, 403, "forbidden_scope")
    limited = await make_key(scopes=["echo:read"], rate_limit=RateLimitSpec(2, 60))
    statuses = []
    for _ in range(3):
        async with http.get(f"{gateway.url}/echo/x", headers=bearer(limited.secret)) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 429]
    for issued in keys:
        record = await store.get(issued.record.id)
        assert record is not None and record.total_uses == 1

    admin = await make_key(scopes=["*"], name="lister")
    async with http.get(
        f"{gateway.url}/v1/api-keys", headers={"x-api-key": admin.secret or ""}
    ) as r:
        assert r.status == 200, await r.text()
        listed = [k["name"] for k in (await r.json())["api_keys"]]
    assert sorted(n for n in listed if n and n.startswith("p")) == [f"p{i}" for i in range(9)]


async def test_spending_cap_holds_on_the_cluster(
    start_cost_gateway: Any, make_key: MakeKey, http: aiohttp.ClientSession, store: KeyStore
) -> None:
    gateway: Gateway = await start_cost_gateway()
    issued = await make_key(limit_micro=1_000_000, limit_reset="monthly")  # 4 x 0.25
    statuses = []
    for _ in range(5):
        async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 200, 200, 402]
    _, report = await store.report(issued.record.id)
    assert report is not None and report.usage_micro["total"] == 1_000_000


async def test_a_moved_slot_is_followed_without_a_failed_request(
    cluster: ClusterTopology,
    start_cost_gateway: Any,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    store: KeyStore,
) -> None:
    gateway: Gateway = await start_cost_gateway()
    issued = await make_key()
    slot = key_slot(store.names.record(issued.record.id))
    home = cluster.owner_of_slot(slot)
    away = next(a for a in cluster.seeds if a != home)

    async def charge() -> int:
        async with http.get(f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) as r:
            return r.status

    assert await charge() == 200  # the gateway knows the slot map now
    try:
        cluster.migrate_slot(slot, away)
        assert [await charge() for _ in range(3)] == [200, 200, 200]  # MOVED, followed

        # Half moved back: the key's data is on the target, the slot still the source's.
        cluster.begin_migration(slot, home)
        source = cluster.client(away)
        in_slot = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)  # type: ignore[no-untyped-call]
        keys = [_text(k) for k in in_slot]
        cluster.move_keys(keys)
        # One key: the source answers ASK, and the target answers after ASKING.
        lookup = store.names.by_hash(issued.record.hash)
        assert await gateway.mux.execute("GET", lookup) == issued.record.id
        # The authorize script names keys that need not exist (usage buckets, rate state):
        # mid-migration the cluster answers TRYAGAIN, and the gateway retries until the
        # slot has moved, within socket_timeout.
        request = asyncio.ensure_future(charge())
        await asyncio.sleep(0.2)
        assert not request.done()
        cluster.finish_migration(slot, home)
        assert await request == 200
        assert await charge() == 200
    finally:
        for node in cluster.seeds:  # whatever happened, the slot ends stable, at home
            cluster.client(node).execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER", "SETSLOT", slot, "STABLE"
            )
        if cluster.owner_of_slot(slot) != home:
            cluster.migrate_slot(slot, home)
    _, report = await store.report(issued.record.id)
    assert report is not None and report.usage_micro["total"] == 250_000 * 6
    assert gateway.mux.stats.connects >= 2  # a connection to each primary it was sent to


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
