"""Redis peers that hang instead of failing: a connection a NAT silently dropped, a server
that accepts and never answers; and refunds whose reply comes back in an unusual way.

- An idle connection of the proxy's multiplexer is checked (a PING once it has been idle for
  ``redis.health_check_interval``; TCP keepalive besides): one that went dead while nobody
  used it is failed and replaced before a request needs it, instead of costing that
  request its full timeout.
- ``/readyz`` asks the proxy's own Redis path too, not only the admin side's client.
- The reservation of an authorization whose client left while it ran is refunded when the
  reply's text is bytes, and when the reply is read in the same loop turn as the client's
  departure.

The Sentinel and Cluster cases (a hung sentinel listed first, the refund on an ASK
redirection) need the real topologies: tests/topology/test_sentinel_peers.py and
tests/topology/test_cluster_ask_refund.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.admin.app import build_admin_app
from gateway.config.load import ConfigError, build
from gateway.config.model import Settings
from gateway.store.cluster_multiplex import multiplexer_for
from gateway.store.connection import StoreClient
from gateway.store.keystore import KeyStore
from gateway.store.multiplex import LuaScript, RedisMultiplexer
from gateway.store.names import KeyNames
from tests.conftest import MakeKey, bearer
from tests.hostile.redis_peers import relay_to, relayed_url, silent_server
from tests.proxy.conftest import Gateway, StartGateway

Client = Callable[..., Awaitable[TestClient[Any, Any]]]
StartCostGateway = Callable[..., Awaitable[Gateway]]


async def eventually(what: str, check: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {within:g}s"
        await asyncio.sleep(0.02)


async def get_status(http: aiohttp.ClientSession, url: str, secret: str | None) -> int:
    async with http.get(url, headers=bearer(secret)) as response:
        await response.read()
        return response.status


# --- an idle connection that went dead -------------------------------------------------------


@pytest.mark.single_server
async def test_a_black_holed_idle_connection_is_replaced_before_the_next_request_needs_it(
    start_gateway: StartGateway, make_key: MakeKey, http: aiohttp.ClientSession, redis_url: str
) -> None:
    async with relay_to(redis_url) as relay:
        gateway = await start_gateway(
            redis={
                "url": relayed_url(redis_url, relay.port),
                "socket_timeout": 0.5,
                "health_check_interval": 0.2,
            }
        )
        issued = await make_key(scopes=["echo:read"])
        url = f"{gateway.url}/echo/x"
        assert await get_status(http, url, issued.secret) == 200
        stats = gateway.mux.stats
        # A healthy idle connection answers its checks and is kept.
        await eventually("two idle checks", lambda: stats.health_checks >= 2, within=3)
        assert (stats.connects, stats.timeouts, relay.connections) == (1, 0, 1)

        relay.black_hole()  # the path drops everything; neither end is told
        # Nobody sends anything: the idle check's PING goes unanswered, and once it is
        # socket_timeout overdue the connection is failed.
        await eventually("the dead connection found", lambda: stats.timeouts == 1, within=3)

        started = time.monotonic()
        assert await get_status(http, url, issued.secret) == 200  # over a fresh connection
        assert time.monotonic() - started < 0.5 + 1.0  # no reply timeout was waited out
        assert (stats.connects, relay.connections) == (2, 2)


@pytest.mark.single_server
async def test_the_proxys_redis_connection_has_tcp_keepalive(redis_url: str) -> None:
    # What the kernel does with keepalive is not visible on loopback (the relay's kernel
    # answers the probes), so this checks the socket options the connection carries.
    async with relay_to(redis_url) as relay:
        url = relayed_url(redis_url, relay.port)
        mux = RedisMultiplexer(url, connect_timeout=1, socket_timeout=1)
        try:
            assert await mux.execute("PING") == "PONG"
            connection = mux._connection
            assert connection is not None and connection._transport is not None
            sock = connection._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
                # Far below the kernel's default of two hours before the first probe.
                assert idle + count * interval <= 120, (idle, interval, count)
        finally:
            await mux.close()


def test_health_check_interval_is_validated_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        build({"redis": {"health_check_interval": -1}}, tmp_path)
    assert refused.value.problems == ["redis.health_check_interval: must be a finite number >= 0"]
    assert build({"redis": {"health_check_interval": 0}}, tmp_path).redis.health_check_interval == 0
    assert build({}, tmp_path).redis.health_check_interval == 15.0


# --- /readyz asks the proxy's path ------------------------------------------------------------


async def test_readyz_is_503_when_the_proxys_redis_hangs_though_the_admin_client_answers(
    aiohttp_client: Client, settings: Settings, store: KeyStore, redis: StoreClient, tmp_path: Path
) -> None:
    async with silent_server() as hung:
        host, port = hung.address
        # The proxy's only sentinel accepts and never answers; the admin client is fine.
        url = f"redis+sentinel://{host}:{port}/keygate"
        proxy_side = build({"redis": {"url": url, "connect_timeout": 0.3}}, tmp_path).redis
        broken = multiplexer_for(proxy_side, url)
        try:
            http = await aiohttp_client(build_admin_app(settings, store, readiness=broken.ping))
            started = time.monotonic()
            response = await http.get("/readyz")
            assert time.monotonic() - started < settings.redis.socket_timeout + 1
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert await response.json() == {"status": "unavailable", "reason": "redis unreachable"}
            assert hung.connections >= 1  # it was the proxy's path that was asked
            assert await redis.ping()  # while the admin side's client answers
        finally:
            await broken.close()

    working = multiplexer_for(settings.redis, settings.redis.url)
    try:
        http = await aiohttp_client(build_admin_app(settings, store, readiness=working.ping))
        response = await http.get("/readyz")
        assert (response.status, await response.json()) == (200, {"status": "ready"})
        assert working.stats.connects >= 1
    finally:
        await working.close()


# --- a refund whatever the reply's text type, or its timing --------------------------------------


@pytest.mark.single_server
async def test_an_abandoned_authorization_is_refunded_when_replies_are_bytes(
    start_cost_gateway: StartCostGateway,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: StoreClient,
    redis_url: str,
    key_prefix: str,
) -> None:
    gateway = await start_cost_gateway()
    # The same proxy, its Redis replies handed over undecoded (bytes): the authorizer and
    # the settlements both use it.
    raw = RedisMultiplexer(redis_url, connect_timeout=1, socket_timeout=1, decode_responses=False)
    authorizer = gateway.proxy.authorizer
    decoded, authorizer.redis = authorizer.redis, raw
    try:
        issued = await make_key(limit_micro=1_000_000)
        names = KeyNames(key_prefix)
        total = names.usage(issued.record.id, "t")
        path = f"{gateway.url}/c/header"
        assert await get_status(http, f"{path}?cost=0", issued.secret) == 200  # warm
        await gateway.proxy.settlements.drain()  # its reservation is handed back first
        # The client gives up while its authorize script waits (writes are paused): the
        # script runs later, reserves 1.0 (the route's reserve), and its late reply must
        # hand that back.
        await redis.execute_command("CLIENT", "PAUSE", "400", "WRITE")
        with contextlib.suppress(TimeoutError):
            async with http.get(
                f"{path}?cost=0.5",
                headers=bearer(issued.secret),
                timeout=aiohttp.ClientTimeout(total=0.15),
            ) as response:
                await response.read()
        await asyncio.sleep(0.7)  # the pause ends, the script runs, its late reply arrives
        await raw.late_replies_handled()
        await gateway.proxy.settlements.drain()
        record = names.record(issued.record.id)
        assert await redis.hget(record, "total_uses") == "2"  # the abandoned one ran
        assert int(await redis.get(total) or 0) == 0  # and what it reserved came back
        assert gateway.proxy.settlements.failed == 0
    finally:
        authorizer.redis = decoded
        await raw.close()


@pytest.mark.single_server
async def test_a_reply_handled_in_the_same_turn_as_its_callers_cancellation_is_handed_over(
    redis_url: str, redis: StoreClient, key_prefix: str
) -> None:
    # A client that disconnects just as its authorization's reply comes in: the reply is
    # read (its caller's future done) and the caller cancelled in the same loop turn,
    # before the caller resumed. The reply must still reach the late-reply handler.
    script = LuaScript.from_source("return redis.call('INCR', KEYS[1])")
    counter = f"{key_prefix}runs"
    mux = RedisMultiplexer(redis_url, connect_timeout=1, socket_timeout=1)
    late: list[Any] = []
    try:
        assert await mux.evalsha(script, [counter], []) == 1  # connected, script cached
        written = mux.stats.commands
        await redis.execute_command("CLIENT", "PAUSE", "200", "WRITE")  # no reply before
        call = asyncio.ensure_future(mux.run_script(script, [counter], [], late.append))
        await eventually("the script sent", lambda: mux.stats.commands > written, within=2)
        # The loop is held (on purpose) while the pause ends and the server answers.
        time.sleep(0.4)  # noqa: ASYNC251
        # A timer due now runs after the next turn's socket reads: the reply is read first.
        asyncio.get_running_loop().call_later(0, call.cancel)
        await asyncio.wait([call])
        assert call.cancelled()
        await mux.late_replies_handled()  # (had the reply come later, it would be handed here)
        assert await redis.get(counter) == "2"  # the script ran
        assert late == [2]  # and its reply reached the handler
    finally:
        await mux.close()
