"""A sentinel that accepts connections and never answers, listed first in the URL before the
real sentinels of a Sentinel group (``sentinel_group``): it must cost a share of
``redis.connect_timeout``, not all of it, and be asked last from then on.

In this module ``redis_url`` is the group's own URL (the key store and ``make_key`` reach the
primary through the real sentinels); the proxy's URL adds the silent one in front.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import pytest

from tests.conftest import MakeKey, bearer
from tests.hostile.redis_peers import silent_server
from tests.proxy.conftest import Gateway
from tests.topologies import SentinelTopology, start_sentinel_group

pytestmark = pytest.mark.timeout(120)

StartCostGateway = Callable[..., Awaitable[Gateway]]
FIXED = "/c/fixed"
CONNECT_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """One group for the module (the conftest's is per test because its tests kill the
    primary; these leave it alone)."""
    with start_sentinel_group(tmp_path_factory.mktemp("sentinel")) as topology:
        yield topology


@pytest.fixture
def redis_url(sentinel_group: SentinelTopology) -> str:
    return sentinel_group.url


async def test_a_silent_first_sentinel_is_passed_over_within_the_connect_budget_then_asked_last(
    sentinel_group: SentinelTopology,
    start_cost_gateway: StartCostGateway,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
) -> None:
    issued = await make_key()
    async with silent_server() as silent:
        hosts = [silent.address, *sentinel_group.sentinels]
        url = "redis+sentinel://{}/{}".format(
            ",".join(f"{h}:{p}" for h, p in hosts), sentinel_group.service
        )
        gateway = await start_cost_gateway(
            redis={"url": url, "connect_timeout": CONNECT_TIMEOUT, "socket_timeout": 1.0}
        )
        started = time.monotonic()
        async with http.get(f"{gateway.url}{FIXED}", headers=bearer(issued.secret)) as response:
            assert response.status == 200, await response.text()
        # Connecting (sentinels, primary, ROLE) fit in the budget, the silent one included.
        assert time.monotonic() - started < CONNECT_TIMEOUT + 1.0
        assert silent.connections == 1  # it was asked first, and passed over

        # Drop the proxy's connection from the primary's side: the next call reconnects,
        # asking the sentinels again, a real one first now.
        own_id = await gateway.mux.execute("CLIENT", "ID")
        with sentinel_group.client(sentinel_group.primary_address()) as primary:
            assert primary.client_kill_filter(_id=own_id) == 1
        connects = gateway.mux.stats.connects
        deadline = time.monotonic() + 5
        while gateway.mux.stats.connects == connects:
            assert time.monotonic() < deadline, "the proxy did not reconnect within 5 s"
            await asyncio.sleep(0.02)
            await gateway.mux.connect()
        async with http.get(f"{gateway.url}{FIXED}", headers=bearer(issued.secret)) as response:
            assert response.status == 200, await response.text()
        assert silent.connections == 1  # not asked again: a sentinel that answered was first
