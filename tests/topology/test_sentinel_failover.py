"""keygate behind Sentinel: a primary, a replica and three sentinels (``sentinel_group``).

The primary is SIGKILLed while clients keep sending requests through one in-process
gateway. keygate must recover by itself (the same proxy and key-store objects, no restart):
requests during the failover get 503 + Retry-After, none gets a wrong answer (a valid key is
never unknown, over its limit or forbidden), and with ``redis.replica_acks: 1`` no charge
the proxy acted on is lost with the old primary.

In this module ``redis_url`` is the group's ``redis+sentinel://`` URL, so the root
conftest's ``settings``, ``redis``, ``store`` and ``make_key`` (and ``start_gateway``) all
reach the primary through the sentinels.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.config.model import Settings
from gateway.store.connection import StoreClient, connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, assert_problem
from tests.topologies import Address, SentinelTopology

pytestmark = pytest.mark.timeout(120)

StartCostGateway = Callable[..., Awaitable[Gateway]]

FIXED = "/c/fixed"  # COST_ROUTES: a fixed cost of 0.25, reserved by the authorize script
COST_MICRO = 250_000
# Fast failures: a dead primary costs a request at most this long, not a hang. WAIT's
# timeout must stay under the reply timeout (the config refuses it otherwise).
FAST = {"connect_timeout": 0.5, "socket_timeout": 0.5}
ACKS = {"replica_acks": 1, "replica_ack_timeout": 0.2}

WORKERS = 8
WARM_UP_OKS = 20  # 200s before the kill
OKS_AFTER_FAILOVER = 50  # 200s sent after the sentinels agree on the new primary
PACE = 0.005  # seconds between one worker's requests (pacing only, nothing is timed)


@pytest.fixture
def redis_url(sentinel_group: SentinelTopology) -> str:
    return sentinel_group.url


@pytest.fixture
async def redis(settings: Settings, redis_url: str) -> AsyncIterator[StoreClient]:
    """The key store's client, through the sentinels. No cleanup of keys: the whole group
    (its data included) is thrown away after each test, and the root conftest's cleanup
    would talk to a group that a failed test may have left without a primary."""
    client = connect(settings.redis, redis_url)
    yield client
    with contextlib.suppress(RedisError, OSError):
        await client.aclose()


def other_node(group: SentinelTopology, address: Address) -> Address:
    """The data node that is not ``address`` (the replica, for the current primary)."""
    return next(n.address for n in group.data_nodes if n.address != address)


async def eventually(what: str, check: Callable[[], Any], within: float) -> None:
    """Poll ``check`` (sync or async; true when done) for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{what} did not happen within {within:g}s"
        await asyncio.sleep(0.02)


# --- traffic ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    sent: float  # time.monotonic() when the request was sent
    answered: float  # time.monotonic() when its response head arrived
    status: int
    retry_after: str | None
    problem: str | None  # for a 503: why assert_problem rejected it (None: a proper one)


@dataclass
class Traffic:
    """``WORKERS`` clients looping requests with one key until ``stop`` is set."""

    http: aiohttp.ClientSession
    url: str
    secret: str
    seen: list[Seen]
    errors: list[BaseException]
    stop: asyncio.Event

    async def worker(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                async with self.http.get(self.url, headers=bearer(self.secret)) as response:
                    answered = time.monotonic()
                    problem = None
                    if response.status == 503:
                        try:
                            await assert_problem(response, 503, "store_error")
                        except AssertionError as exc:
                            problem = str(exc) or repr(exc)
                    else:
                        await response.read()
                    self.seen.append(
                        Seen(
                            sent,
                            answered,
                            response.status,
                            response.headers.get("Retry-After"),
                            problem,
                        )
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:  # a hang or a dropped request
                self.errors.append(exc)
                return
            await asyncio.sleep(PACE)

    def oks(self, since: float = 0.0) -> int:
        return sum(1 for s in self.seen if s.status == 200 and s.sent >= since)

    async def wait_for_oks(self, count: int, since: float, within: float) -> None:
        def enough() -> bool:
            assert not self.errors, f"a client failed: {self.errors[0]!r}"
            return self.oks(since) >= count

        await eventually(f"{count} responses of 200", enough, within)


@contextlib.asynccontextmanager
async def traffic(http: aiohttp.ClientSession, url: str, secret: str) -> AsyncIterator[Traffic]:
    running = Traffic(http, url, secret, [], [], asyncio.Event())
    tasks = [asyncio.create_task(running.worker()) for _ in range(WORKERS)]
    try:
        yield running
    finally:
        running.stop.set()
        _, pending = await asyncio.wait(tasks, timeout=15)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert not pending, "a client did not finish its last request within 15 s"


# --- tests --------------------------------------------------------------------------------------


async def test_primary_killed_mid_traffic_recovers_without_restart_and_loses_no_charge(
    sentinel_group: SentinelTopology,
    start_cost_gateway: StartCostGateway,
    make_key: MakeKey,
    store: KeyStore,
    settings: Settings,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_cost_gateway(redis={**FAST, **ACKS})
    issued = await make_key(workspace_id="ws-failover")
    assert issued.secret is not None
    key_id = issued.record.id
    names = KeyNames(settings.redis.key_prefix)
    old = sentinel_group.primary_address()
    # The key must be on the replica before the primary dies, or the new primary would
    # rightly say it does not know it.
    with sentinel_group.client(other_node(sentinel_group, old)) as replica:
        await eventually(
            "the key record reaching the replica", lambda: replica.exists(names.record(key_id)), 10
        )

    async with traffic(http, f"{gateway.url}{FIXED}", issued.secret) as running:
        await running.wait_for_oks(WARM_UP_OKS, since=0.0, within=20)
        killed_at = time.monotonic()
        assert await asyncio.to_thread(sentinel_group.kill_primary) == old
        # Read now: batches after this run on the new primary, which has no replica left.
        unreplicated_before_kill = gateway.mux.stats.unreplicated
        connects_before = gateway.mux.stats.connects
        new = await asyncio.to_thread(sentinel_group.wait_for_failover, old)
        failed_over_at = time.monotonic()
        await running.wait_for_oks(OKS_AFTER_FAILOVER, since=failed_over_at, within=30)
    seen, errors = running.seen, running.errors

    assert not errors, f"a client failed: {errors[0]!r}"
    statuses = [s.status for s in seen]
    # No wrong answer: a valid key with no limits is served (200) or the store is said to
    # be unavailable (503); never 401 unknown key, 402, 403, 500, ...
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    unavailable = [s for s in seen if s.status == 503]
    assert all(s.retry_after == "1" for s in unavailable)
    assert [s.problem for s in unavailable if s.problem] == []
    # The kill happened mid-traffic: requests sent after it were refused (503) ...
    assert any(s.sent >= killed_at for s in unavailable)
    # ... and none answered before it (one in flight at the kill may be refused); every
    # batch before it was acknowledged by the replica.
    assert not any(s.answered < killed_at for s in unavailable)
    assert unreplicated_before_kill == 0
    # Recovered without a restart: the same gateway serves again, from the new primary.
    assert running.oks(since=failed_over_at) >= OKS_AFTER_FAILOVER
    assert gateway.mux.stats.connects > connects_before
    assert sentinel_group.role(new) == "master"

    # No settled usage lost: every 200 was charged before it was forwarded, and its charge
    # was on the replica (WAIT) before the proxy acted on it. No 503 is charged: one whose
    # connection died after its script ran (its reply, or WAIT's, never came) has its
    # reservation released (settled at 0, retried until the new primary takes it; a no-op
    # where the write never reached it). Its use still counts in total_uses.
    await gateway.proxy.settlements.drain()
    oks, refused = statuses.count(200), statuses.count(503)
    with sentinel_group.client(new) as primary:
        total_micro = int(primary.get(names.usage(key_id, "t")) or 0)
        total_uses = int(primary.hget(names.record(key_id), "total_uses") or 0)
    numbers = {"200": oks, "503": refused, "total_micro": total_micro, "uses": total_uses}
    assert total_micro == oks * COST_MICRO, numbers
    assert oks <= total_uses <= oks + refused, numbers
    # Tighter: a request is charged and refused only when the connection its script ran on
    # failed before the reply: when the old primary died, or when a reply was overdue
    # (stats.timeouts; none expected, as WAIT's timeout is under the reply timeout). Each
    # failure fails at most one request per client: a client has one in flight at a time.
    # Later requests failed to connect (not run), or ran on the new primary and got 200.
    failures = 1 + gateway.mux.stats.timeouts
    assert total_uses - oks <= WORKERS * failures, {**numbers, "failures": failures}

    # The admin side's key store (redis-py's Sentinel client) follows the failover too,
    # without being rebuilt, and sees the same usage.
    record = await store.get(key_id)
    assert record is not None and record.total_uses == total_uses
    status, report = await store.report(key_id)
    assert status == "ok" and report is not None
    assert report.usage_micro["total"] == total_micro
    page = await store.list(workspace_id="ws-failover")
    assert [r.id for r in page.records] == [key_id]
    later = await make_key(workspace_id="ws-failover")
    async with http.get(f"{gateway.url}{FIXED}", headers=bearer(later.secret)) as response:
        assert response.status == 200, await response.text()
    print(  # the numbers, for the record (pytest -s)
        f"\nfailover {old} -> {new} in {failed_over_at - killed_at:.2f}s: {oks} x 200, "
        f"{refused} x 503; total {total_micro} micro in "
        f"[{oks * COST_MICRO}, {(oks + refused) * COST_MICRO}], total_uses {total_uses}; "
        f"unreplicated batches after the failover: {gateway.mux.stats.unreplicated}, "
        f"reply timeouts: {gateway.mux.stats.timeouts}; 503s sent after the failover: "
        f"{sum(1 for s in unavailable if s.sent >= failed_over_at)}, the last "
        f"{max(s.sent for s in unavailable) - failed_over_at:+.2f}s after it"
    )


async def test_without_a_replica_after_the_failover_requests_in_a_row_are_served(
    sentinel_group: SentinelTopology,
    start_cost_gateway: StartCostGateway,
    make_key: MakeKey,
    settings: Settings,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_cost_gateway(redis={**FAST, **ACKS})
    issued = await make_key()
    names = KeyNames(settings.redis.key_prefix)
    old = sentinel_group.primary_address()
    with sentinel_group.client(other_node(sentinel_group, old)) as replica:
        await eventually(
            "the key record reaching the replica",
            lambda: replica.exists(names.record(issued.record.id)),
            10,
        )
    await asyncio.to_thread(sentinel_group.kill_primary)
    await asyncio.to_thread(sentinel_group.wait_for_failover, old)
    url, headers = f"{gateway.url}{FIXED}", bearer(issued.secret)

    async def status(after: float = 0.0) -> int:
        await asyncio.sleep(after)
        async with http.get(url, headers=headers) as response:
            await response.read()
            return response.status

    async def served() -> bool:
        return await status() == 200

    await eventually("a 200 from the new primary", served, 15)
    # The old primary stays down: no replica acknowledges, every WAIT runs its full 0.2 s.
    # Eight requests 20 ms apart: those that come while a WAIT is out go with the next one,
    # so no batch waits behind more than one WAIT, and none times out.
    unreplicated = gateway.mux.stats.unreplicated
    statuses = await asyncio.gather(*(status(after=0.02 * i) for i in range(8)))
    assert statuses == [200] * 8
    assert gateway.mux.stats.unreplicated > unreplicated
    assert gateway.mux.stats.timeouts == 0


async def test_sentinel_url_serves_requests_end_to_end(
    sentinel_group: SentinelTopology,
    start_cost_gateway: StartCostGateway,
    make_key: MakeKey,
    settings: Settings,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_cost_gateway(redis=FAST)
    issued = await make_key()
    for _ in range(3):
        async with http.get(f"{gateway.url}{FIXED}", headers=bearer(issued.secret)) as response:
            assert response.status == 200, await response.text()
            assert await response.json() == {"ok": True}
    async with http.get(
        f"{gateway.url}{FIXED}", headers=bearer(f"kg_{uuid.uuid4().hex}")
    ) as response:
        await assert_problem(response, 401, "invalid_key")
    names = KeyNames(settings.redis.key_prefix)
    with sentinel_group.client(sentinel_group.primary_address()) as primary:
        assert primary.get(names.usage(issued.record.id, "t")) == str(3 * COST_MICRO)
        assert primary.hget(names.record(issued.record.id), "total_uses") == "3"


async def test_unknown_service_name_is_503_with_retry_after_not_a_hang(
    sentinel_group: SentinelTopology,
    start_cost_gateway: StartCostGateway,
    make_key: MakeKey,
    settings: Settings,
    http: aiohttp.ClientSession,
) -> None:
    wrong = sentinel_group.url.rsplit("/", 1)[0] + "/no-such-service"
    gateway = await start_cost_gateway(redis={"url": wrong, **FAST})
    issued = await make_key()  # a real key (in the real service): it must not matter
    for _ in range(2):  # the second must not wait on the first's failure
        started = time.monotonic()
        async with http.get(
            f"{gateway.url}{FIXED}",
            headers=bearer(issued.secret),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as response:
            await assert_problem(response, 503, "store_error")
            assert response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 2.0
    # The key store says the same, as an error naming the service.
    client = connect(settings.redis, wrong)
    try:
        with pytest.raises(RedisConnectionError, match="no-such-service"):
            await client.ping()
    finally:
        await client.aclose()
