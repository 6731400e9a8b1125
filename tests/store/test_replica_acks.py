"""redis.replica_acks: replies wait for Redis WAIT; too few replicas are counted, not fatal.

The session's server has no replica, so WAIT always times out here: each batch is
counted as unreplicated and its replies still reach their callers, in order. A replica
that confirms (and a failover that keeps what it confirmed) is in tests/topology.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.store.multiplex import LuaScript, RedisMultiplexer

# One server's multiplexer, CLIENT commands and WAIT; a Cluster's is in tests/topology.
pytestmark = pytest.mark.single_server

INCR = LuaScript.from_source("return redis.call('INCRBY', KEYS[1], ARGV[1])")


async def test_replies_arrive_after_wait_and_each_short_batch_is_counted(
    redis_url: str, key_prefix: str, redis: Redis
) -> None:
    mux = RedisMultiplexer(
        redis_url, connect_timeout=2, socket_timeout=2, replica_acks=1, replica_ack_timeout=0.05
    )
    counted: list[int] = []
    mux.on_unreplicated = lambda: counted.append(1)
    key = f"{key_prefix}n"
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = await asyncio.gather(*(mux.execute("INCR", key) for _ in range(20)))
        waited = loop.time() - started
        second = await asyncio.gather(*(mux.execute("INCR", key) for _ in range(5)))
    finally:
        await mux.close()
    assert first == list(range(1, 21)) and second == list(range(21, 26))
    assert waited >= 0.05  # the replies waited for WAIT's timeout
    assert mux.stats.unreplicated == len(counted) >= 2  # one per batch, at least
    assert await redis.get(key) == "25"


async def test_a_cancelled_callers_reply_still_reaches_its_handler(
    redis_url: str, key_prefix: str, redis: Redis
) -> None:
    mux = RedisMultiplexer(
        redis_url, connect_timeout=2, socket_timeout=2, replica_acks=1, replica_ack_timeout=0.2
    )
    late: list[Any] = []
    key = f"{key_prefix}late"
    try:
        await mux.execute("SCRIPT", "LOAD", INCR.source)
        call = asyncio.ensure_future(mux.run_script(INCR, [key], [7], late.append))
        await asyncio.sleep(0.05)  # sent; WAIT still waiting
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        assert late == []  # WAIT has not answered yet
        await mux.late_replies_handled()
    finally:
        await mux.close()
    assert late == [7]
    assert await redis.get(key) == "7"
