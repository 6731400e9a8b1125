"""Fixtures for the exactness tests: everything is a real process, as in production.

- ``cost_upstream``: ``python -m tests.costs PORT`` (the upstream that states its own cost)
  as a child process, so this test's event loop drives only the clients.
- ``replicas``: TWO ``keygate serve`` processes sharing the session's Redis and the test's
  key prefix, each with its own proxy and admin port, both with ``ROUTES``.
- ``client``: one aiohttp session without a connection limit.

Every process started here is stopped by its pid at teardown, also when the test failed.
Money is read straight from Redis (integer micro-units), as the gateways wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.usage.periods import PERIODS, bucket
from tests.procs import Serve, clean_env, free_port, write_config

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


def _route(name: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "path": f"/c/{name}", "upstream": "costs", "rewrite": target, **extra}


ROUTES: list[dict[str, Any]] = [
    _route("fixed", "/flat", cost={"fixed": 0.25}),
    _route("header", "/header", cost={"header": "X-Usage-Cost"}, reserve=1.0),
    _route("sse", "/sse", cost={"json": "usage.total_tokens", "per_unit": 0.001}, reserve=0.1),
    _route("free", "/flat"),
]


# --- the upstream ----------------------------------------------------------------------------


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"upstream exited {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.02)
    raise AssertionError(f"upstream not listening on {port} within {timeout}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(5)


@contextlib.contextmanager
def module_upstream(module: str, errors: Path) -> Iterator[str]:
    """``python -m module PORT`` in its own process on a free loopback port, its stderr in
    ``errors``; yields its base URL once it listens, and stops it after."""
    port = free_port()
    with errors.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
            env=clean_env(),
        )
    try:
        _wait_listening(port, process)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        _stop(process)


@pytest.fixture
def cost_upstream(tmp_path: Path) -> Iterator[str]:
    """tests/costs.py in its own process on a free loopback port; yields its base URL."""
    with module_upstream("tests.costs", tmp_path / "costs.err") as url:
        yield url


# --- two gateways ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    """One ``keygate serve`` process."""

    serve: Serve
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def terminate(self) -> int:
        """SIGTERM; the exit code once it has drained (without blocking the event loop)."""
        return await asyncio.to_thread(self.serve.signal, signal.SIGTERM)


def gateway_config(redis_url: str, key_prefix: str, upstream_url: str) -> dict[str, Any]:
    return {
        "listen": f"{LOOPBACK}:{free_port()}",
        "admin_listen": f"{LOOPBACK}:{free_port()}",
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "log": {"level": "warning"},
        "upstreams": {"costs": {"url": upstream_url, "pool_size": 300}},
        "routes": ROUTES,
    }


@pytest.fixture
def replicas(
    redis: Redis, redis_url: str, key_prefix: str, cost_upstream: str, tmp_path: Path
) -> Iterator[tuple[Replica, Replica]]:
    """Two gateways on one Redis and one key prefix. Depends on ``redis`` so that both are
    stopped before that fixture deletes the test's keys."""
    started: list[Replica] = []
    try:
        for n in range(2):
            config = gateway_config(redis_url, key_prefix, cost_upstream)
            path = write_config(tmp_path / f"gateway{n}.yaml", config)
            port = int(config["listen"].rsplit(":", 1)[1])
            started.append(Replica(Serve(path, tmp_path), port))
        for replica in started:
            replica.serve.wait_ready()
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.serve.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:
        yield session


# --- reading what the gateways wrote ---------------------------------------------------------


async def usage(redis: Redis, prefix: str, key_id: str, bucket_name: str) -> int:
    """Micro-units in one usage bucket: ``t``, ``d:YYYYMMDD``, ``w:YYYYWnn``, ``m:YYYYMM``."""
    return int(await redis.get(f"{prefix}u:{{{key_id}}}:{bucket_name}") or 0)


async def total_uses(redis: Redis, prefix: str, key_id: str) -> int:
    return int(await redis.hget(f"{prefix}k:{{{key_id}}}", "total_uses") or 0)


async def current_buckets(redis: Redis) -> list[str]:
    """Names of the day, week and month buckets now, by the Redis server's clock (the one
    the scripts charge by)."""
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    return [bucket(period, now_ms).name for period in PERIODS]


async def assert_every_bucket(
    redis: Redis, prefix: str, key_id: str, buckets: list[str], expected: int
) -> None:
    """The total and each period's bucket hold exactly ``expected`` (a fresh key).

    ``buckets`` are taken at the test's start; a run that straddles UTC midnight cannot
    say which day was charged, so it is skipped rather than guessed."""
    if await current_buckets(redis) != buckets:
        pytest.skip("the test straddled a period boundary")
    found = {name: await usage(redis, prefix, key_id, name) for name in ["t", *buckets]}
    assert found == dict.fromkeys(["t", *buckets], expected)
