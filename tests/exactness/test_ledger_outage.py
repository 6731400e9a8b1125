"""Redis stopped for about 2 s while requests flow through a ``keygate serve`` process:
requests answered 200 are charged exactly their actual cost (their settlements are retried
through the outage, and applied once), requests refused with 503 cost nothing, and no
settlement is lost. The test owns its Redis (a private server with an append-only file, so
its data survives the restart)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as sync_redis
from redis.asyncio import Redis as AsyncRedis

from gateway.config.load import build
from gateway.embedded import server_binary
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames
from tests.conftest import bearer
from tests.exactness.conftest import LOOPBACK, gateway_config
from tests.procs import Serve, free_port, write_config

CLIENTS = 16
OUTAGE = 2.0  # seconds without Redis
COSTS = (1_000, 2_000, 3_000, 5_000, 7_000)  # micro-units the upstream states, in turn
RESERVE = 0.01


class OwnRedis:
    """A private server on its own loopback port, append-only, fsync on every write;
    stopped and started by this test, always by its PID."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.argv = [str(server_binary()), "--port", str(self.port), "--bind", LOOPBACK]
        self.argv += ["--dir", str(root), "--save", "", "--appendonly", "yes"]
        self.argv += ["--appendfsync", "always"]
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}"

    def _answers(self) -> bool:
        client = sync_redis.Redis(port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        except (sync_redis.ConnectionError, sync_redis.TimeoutError, sync_redis.ResponseError):
            return False
        finally:
            client.close()

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.process.returncode is None, "the Redis server exited at start"
            assert time.monotonic() < deadline, "the Redis server did not answer within 10 s"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 10)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(tmp_path / "own-redis")
    await server.start()
    yield server
    if server.process is not None:
        server.process.kill()
        await server.process.wait()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


async def test_settlements_survive_a_redis_outage_exactly(
    own_redis: OwnRedis,
    cost_upstream: str,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    prefix = "kgo:"
    config: dict[str, Any] = gateway_config(own_redis.url, prefix, cost_upstream)
    config["redis"] |= {"connect_timeout": 0.3, "socket_timeout": 0.3}
    settings = build({"redis": config["redis"]}, tmp_path)
    store_client = connect(settings.redis, own_redis.url)
    store = KeyStore(store_client, KeyNames(prefix), "kg_")
    await store.scripts.load()
    issued = await store.create({"workspace_id": "ws-a", "user_id": "u", "scopes": ()})
    await store_client.aclose()
    key_id = issued.record.id

    serve = Serve(write_config(tmp_path / "gateway.yaml", config), tmp_path)
    try:
        serve.wait_ready()
        url = f"http://{config['listen']}/c/header"
        charged: list[int] = []  # actual costs of the requests answered 200
        statuses: list[int] = []
        stop = asyncio.Event()
        turn = itertools.count()

        async def traffic() -> None:
            while not stop.is_set():
                cost = COSTS[next(turn) % len(COSTS)]
                # The upstream answers after 0.1 s: many settlements fall in the outage.
                query = f"?cost={cost / 1e6}&delay=0.1"
                try:
                    async with client.get(url + query, headers=bearer(issued.secret)) as got:
                        await got.read()
                        statuses.append(got.status)
                        if got.status == 200:
                            charged.append(cost)
                except aiohttp.ClientError:
                    statuses.append(0)

        tasks = [asyncio.ensure_future(traffic()) for _ in range(CLIENTS)]
        await asyncio.sleep(1.0)
        await own_redis.stop()
        await asyncio.sleep(OUTAGE)
        await own_redis.start()
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*tasks)
        assert 503 in statuses and 200 in statuses, sorted(set(statuses))

        redis = AsyncRedis(port=own_redis.port, decode_responses=True)
        try:
            # Every settlement lands (retried through the outage): nothing left in flight.
            ledger = KeyNames(prefix).ledger_entries(key_id)
            for _ in range(200):  # a safety bound: 20 s
                if not await redis.hlen(ledger):
                    break
                await asyncio.sleep(0.1)
            assert await redis.hlen(ledger) == 0
            used = int(await redis.get(KeyNames(prefix).usage(key_id, "t")) or 0)
        finally:
            await redis.aclose()
        assert used == sum(charged), (used, sum(charged), len(charged))
        async with client.get(f"http://{config['admin_listen']}/metrics") as scraped:
            text = await scraped.text()
        assert _metric(text, "keygate_settlements_lost_total") == 0
    finally:
        serve.close()
