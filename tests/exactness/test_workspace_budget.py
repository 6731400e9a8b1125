"""Workspace budgets across replicas: caps that hold across all of a workspace's keys,
enforced by a second script on the workspace's own slot (on a Cluster, often another
node than the key's), never over the cap.

200 concurrent requests from 4 keys of one workspace through two ``keygate serve``
processes against a workspace cap covering exactly N: exactly N pass; every other one is a
402 naming ``workspace.spend_caps[0]``, and its key's reservation is handed back, so each
key is charged exactly what it was admitted. Money is read straight from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.store.keystore import KeyStore
from gateway.store.record import MICRO, SpendCap
from tests.conftest import MakeKey, bearer, on_cluster
from tests.exactness.conftest import (
    Replica,
    assert_every_bucket,
    current_buckets,
    gateway_config,
    module_upstream,
    usage,
)
from tests.procs import Serve, write_config

REQUESTS = 200
KEYS = 4
ADMITTED = 37  # the workspace's daily cap covers exactly this many requests of 0.25
FIXED = 250_000  # the "fixed" route's cost, micro-units
WORKSPACE = "team"


async def _call(client: aiohttp.ClientSession, url: str, secret: str | None) -> int:
    """The status; a 402 must be the workspace's spend_limited problem."""
    async with client.get(url, headers=bearer(secret)) as response:
        if response.status == 402:
            body = await response.json(content_type=None)
            assert body["code"] == "spend_limited", body
            assert body["cap"]["name"] == "workspace.spend_caps[0]", body
            assert "workspace" in body["detail"], body
            # Retry-After until the cap resets; a cap over all time never does.
            never = body["cap"]["resets_at"] is None
            assert ("Retry-After" not in response.headers) == never, body
            assert never or response.headers["Retry-After"].isdigit()
        else:
            await response.read()
        return response.status


async def _workspace_usage(redis: Redis, store: KeyStore, bucket_name: str) -> int:
    return int(await redis.get(store.names.workspace_usage(WORKSPACE, bucket_name)) or 0)


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check()`` until true; the bound is only a safety net."""
    for _ in range(400):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def test_a_workspace_cap_admits_exactly_the_requests_it_covers_across_keys_and_replicas(
    replicas: tuple[Replica, Replica],
    make_key: MakeKey,
    store: KeyStore,
    client: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    keys = [await make_key(workspace_id=WORKSPACE) for _ in range(KEYS)]
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(ADMITTED * FIXED, "daily"),))
    buckets = await current_buckets(redis)
    statuses = await asyncio.gather(
        *(
            _call(client, f"{replicas[n % 2].url}/c/fixed", keys[n % KEYS].secret)
            for n in range(REQUESTS)
        )
    )
    assert Counter(statuses) == {200: ADMITTED, 402: REQUESTS - ADMITTED}
    # SIGTERM writes every pending settlement, the refused requests' compensations too.
    assert await asyncio.gather(*(replica.terminate() for replica in replicas)) == [0, 0]

    for bucket_name in ["t", *buckets]:
        assert await _workspace_usage(redis, store, bucket_name) == ADMITTED * FIXED
    for k, issued in enumerate(keys):
        admitted = sum(1 for n, s in enumerate(statuses) if n % KEYS == k and s == 200)
        await assert_every_bucket(redis, key_prefix, issued.record.id, buckets, admitted * FIXED)
        assert await store.reservations(issued.record.id) == (0, 0)
    budget = await store.workspaces.get(WORKSPACE)
    assert (budget.in_flight, budget.reserved_micro) == (0, 0)
    assert budget.caps[0].counted_micro == ADMITTED * FIXED
    assert budget.caps[0].remaining_micro == 0


async def test_a_workspace_refusal_leaves_the_key_as_it_was_and_frees_its_slot(
    replicas: tuple[Replica, Replica],
    make_key: MakeKey,
    store: KeyStore,
    client: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    """A key allowed one request in flight is refused by its workspace's used-up cap: the
    key is charged nothing and holds nothing, so once the budget is raised its next
    request passes at once (its one slot was freed, not left to the lease)."""
    issued = await make_key(workspace_id=WORKSPACE, max_in_flight=1)
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(FIXED // 2, "total"),))
    url = f"{replicas[0].url}/c/fixed"
    uses_before = int(await redis.hget(store.names.record(issued.record.id), "total_uses") or 0)
    assert await _call(client, url, issued.secret) == 402
    assert await _call(client, url, issued.secret) == 402
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(FIXED, "total"),))
    assert await _call(client, url, issued.secret) == 200
    assert await replicas[0].terminate() == 0
    assert await usage(redis, key_prefix, issued.record.id, "t") == FIXED
    assert await store.reservations(issued.record.id) == (0, 0)
    assert await _workspace_usage(redis, store, "t") == FIXED
    uses = int(await redis.hget(store.names.record(issued.record.id), "total_uses") or 0)
    assert uses - uses_before == 3  # the refused ones were authorized by the key's script


async def test_a_settlement_below_the_reservation_refunds_the_workspace_too(
    replicas: tuple[Replica, Replica],
    make_key: MakeKey,
    store: KeyStore,
    client: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    """The header route reserves 1.0; each request costs 0.30. Under a workspace cap of
    1.5, a second request fits only because the first one's unspent 0.70 came back."""
    issued = await make_key(workspace_id=WORKSPACE)
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(3 * MICRO // 2, "daily"),))
    url = f"{replicas[1].url}/c/header?cost=0.30"
    spent = 0
    for expected in (200, 200, 402):
        assert await _call(client, url, issued.secret) == expected
        if expected == 200:
            spent += 300_000
        settled = spent

        async def settled_to(total: int = settled) -> bool:
            """Both sides settled (a refusal's hand-back to the key included)."""
            key_total = await usage(redis, key_prefix, issued.record.id, "t")
            return key_total == total and await _workspace_usage(redis, store, "t") == total

        await _until(settled_to, f"the key and the workspace settled to {settled}")
    assert await store.reservations(issued.record.id) == (0, 0)
    budget = await store.workspaces.get(WORKSPACE)
    assert budget.usage_micro["total"] == 600_000
    assert budget.caps[0].counted_micro == 600_000
    assert budget.in_flight == 0


# --- one replica with its own config: store errors, BYOK, a killed replica's leases ---------


@pytest.fixture
def gated_upstream(tmp_path: Path) -> Iterator[str]:
    """tests/exactness/gated.py in its own process: holds /hold until /open."""
    with module_upstream("tests.exactness.gated", tmp_path / "gated.err") as url:
        yield url


def _config(
    redis_url: str, key_prefix: str, costs: str, gated: str, **redis: Any
) -> dict[str, Any]:
    config = gateway_config(redis_url, key_prefix, costs)
    config["redis"].update(redis)
    config["upstreams"]["gated"] = {"url": gated, "pool_size": 50}
    config["routes"] = [
        *config["routes"],
        {
            "name": "byok",
            "path": "/c/byok",
            "upstream": "costs",
            "rewrite": "/flat",
            "cost": {"fixed": 0.25},
            "byok": True,
        },
        {
            "name": "held",
            "path": "/c/held",
            "upstream": "gated",
            "rewrite": "/hold",
            "cost": {"fixed": 0.01},
        },
    ]
    config["reservations"] = {"lease_seconds": LEASE}
    return config


LEASE = 2.0  # seconds: the killed replica's reservations end this soon


@contextlib.contextmanager
def _serving(tmp_path: Path, *configs: dict[str, Any]) -> Iterator[list[Serve]]:
    serves = [
        Serve(write_config(tmp_path / f"w{n}.yaml", c), tmp_path) for n, c in enumerate(configs)
    ]
    try:
        for serve in serves:
            serve.wait_ready()
        yield serves
    finally:
        for serve in serves:
            serve.close()


async def _metric(client: aiohttp.ClientSession, config: dict[str, Any], line: str) -> float:
    """A sample's value on the replica's /metrics (0 when absent)."""
    async with client.get(f"http://{config['admin_listen']}/metrics") as response:
        text = await response.text()
    for sample in text.splitlines():
        name, _, value = sample.rpartition(" ")
        if name == line:
            return float(value)
    return 0.0


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_a_store_error_on_the_workspace_script_follows_on_error(
    redis: Redis,
    redis_url: str,
    key_prefix: str,
    cost_upstream: str,
    gated_upstream: str,
    make_key: MakeKey,
    store: KeyStore,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    on_error: str,
) -> None:
    """The workspace's own slot answers its script with an error (its all-time usage is
    not a number: WRONGTYPE) while the key's slot works: failing closed is a 503 with the
    key's reservation handed back; failing open lets the request through, counted."""
    issued = await make_key(workspace_id=WORKSPACE)
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(MICRO, "total"),))
    await redis.rpush(store.names.workspace_usage(WORKSPACE, "t"), "not a number")
    config = _config(redis_url, key_prefix, cost_upstream, gated_upstream, on_error=on_error)
    with _serving(tmp_path, config) as (serve,):
        async with client.get(
            f"http://{config['listen']}/c/fixed", headers=bearer(issued.secret)
        ) as response:
            body = await response.json(content_type=None)
            status, retry_after = response.status, response.headers.get("Retry-After")
        errors = await _metric(client, config, 'keygate_redis_errors_total{call="workspace"}')
        let_through = await _metric(client, config, "keygate_fail_open_total")
        assert serve.signal(signal.SIGTERM) == 0
    assert errors == 1
    key_usage = await usage(redis, key_prefix, issued.record.id, "t")
    if on_error == "fail_closed":
        assert (status, body["code"], retry_after) == (503, "store_error", "1")
        assert (key_usage, let_through) == (0, 0)
    else:
        assert (status, key_usage, let_through) == (200, FIXED, 1)
    assert await store.reservations(issued.record.id) == (0, 0)
    assert await redis.hlen(store.names.workspace_ledger_entries(WORKSPACE)) == 0


async def test_byok_routes_do_not_count_against_the_workspace(
    redis: Redis,
    redis_url: str,
    key_prefix: str,
    cost_upstream: str,
    gated_upstream: str,
    make_key: MakeKey,
    store: KeyStore,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    issued = await make_key(workspace_id=WORKSPACE)
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(FIXED, "daily"),))
    config = _config(redis_url, key_prefix, cost_upstream, gated_upstream)
    with _serving(tmp_path, config) as (serve,):
        base = f"http://{config['listen']}/c"
        assert await _call(client, f"{base}/fixed", issued.secret) == 200
        assert await _call(client, f"{base}/fixed", issued.secret) == 402  # used up
        assert await _call(client, f"{base}/byok", issued.secret) == 200  # not counted
        assert serve.signal(signal.SIGTERM) == 0
    assert await _workspace_usage(redis, store, "t") == FIXED
    assert await usage(redis, key_prefix, issued.record.id, "bt") == FIXED


async def test_a_killed_replicas_workspace_reservations_resolve_at_their_lease_end(
    redis: Redis,
    redis_url: str,
    key_prefix: str,
    cost_upstream: str,
    gated_upstream: str,
    make_key: MakeKey,
    store: KeyStore,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Three requests held at the upstream when their replica is SIGKILLed: the workspace
    shows them in flight; after their lease, the next request resolves them on the key and
    on the workspace (charged: on_expiry's default), counted in the same metric."""
    issued = await make_key(workspace_id=WORKSPACE)
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(MICRO, "daily"),))
    configs = [_config(redis_url, key_prefix, cost_upstream, gated_upstream) for _ in range(2)]
    with _serving(tmp_path, *configs) as (doomed, survivor):
        held = [
            asyncio.ensure_future(
                client.get(
                    f"http://{configs[0]['listen']}/c/held?gate=never",
                    headers=bearer(issued.secret),
                )
            )
            for _ in range(3)
        ]

        async def holding() -> bool:
            async with client.get(f"{gated_upstream}/stats") as response:
                return int((await response.json())["current"]) >= 3

        await _until(holding, "three requests held at the upstream")
        budget = await store.workspaces.get(WORKSPACE)
        assert (budget.in_flight, budget.reserved_micro) == (3, 30_000)
        doomed.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(doomed.process.wait, 10)
        for request in held:
            with contextlib.suppress(aiohttp.ClientError):
                (await request).release()
        await asyncio.sleep(LEASE + 0.2)  # the leases end by the server's clock: then resolved
        assert await _call(client, f"http://{configs[1]['listen']}/c/fixed", issued.secret) == 200
        expired = await _metric(
            client, configs[1], 'keygate_reservations_expired_total{resolution="charge"}'
        )
        assert survivor.signal(signal.SIGTERM) == 0
    assert expired == 6  # 3 on the key's ledger, 3 on the workspace's
    budget = await store.workspaces.get(WORKSPACE)
    assert (budget.in_flight, budget.reserved_micro) == (0, 0)
    assert budget.usage_micro["total"] == 3 * 10_000 + FIXED
    assert await usage(redis, key_prefix, issued.record.id, "t") == 3 * 10_000 + FIXED


@pytest.mark.skipif(not on_cluster(), reason="needs the key and its workspace on two nodes")
async def test_a_client_that_leaves_while_the_workspace_script_runs_is_charged_nothing(
    replicas: tuple[Replica, Replica],
    make_key: MakeKey,
    store: KeyStore,
    client: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    """The workspace's node holds writes back while the key's answers: the key reserves,
    the workspace's script waits, the client gives up. The key's reservation is handed
    back at once; the workspace's, when the script's late reply arrives."""
    names = store.names
    cluster = cast(RedisCluster, redis)  # the session's server is a Cluster here
    home = cluster.get_node_from_key(names.workspace_budget(WORKSPACE))
    for _ in range(30):
        issued = await make_key(workspace_id=WORKSPACE)
        if cluster.get_node_from_key(names.record(issued.record.id)) != home:
            break
    else:
        raise AssertionError("no key on another node than its workspace")
    await store.workspaces.set_caps(WORKSPACE, (SpendCap(MICRO, "daily"),))
    url = f"{replicas[0].url}/c/fixed"
    assert await _call(client, url, issued.secret) == 200  # connections and slot map known

    async def settled(total: int = FIXED) -> bool:
        key_done = await store.reservations(issued.record.id) == (0, 0)
        budget = await store.workspaces.get(WORKSPACE)
        return key_done and budget.in_flight == 0 and budget.usage_micro["total"] == total

    await _until(settled, "the first request settled")
    await cluster.execute_command("CLIENT", "PAUSE", 600, "WRITE", target_nodes=home)
    with contextlib.suppress(TimeoutError):
        async with client.get(
            url, headers=bearer(issued.secret), timeout=aiohttp.ClientTimeout(total=0.2)
        ) as response:
            await response.read()
    # Without either hand-back, an entry would stay pending until its lease (330 s) ends.
    await _until(settled, "the abandoned request handed back on both slots")
    assert await usage(redis, key_prefix, issued.record.id, "t") == FIXED
    assert await redis.hget(names.record(issued.record.id), "total_uses") == "2"
