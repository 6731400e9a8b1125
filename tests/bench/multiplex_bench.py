"""EVALSHA calls per second: redis.asyncio (a pool) vs RedisMultiplexer (one coalescing socket).

Runs N concurrent workers, each calling the ``authenticate`` script in a loop on one seeded
key record (what the proxy does for every request), for a few seconds per client, on uvloop.
By default it starts a private server the way the test session does (the packaged binary,
unix socket, append-only); ``--url`` points it at another server instead.

    python -m tests.bench.multiplex_bench [--workers 64] [--seconds 3] [--url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import uvloop
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from gateway.embedded import EmbeddedRedis
from gateway.store.multiplex import LuaScript, RedisMultiplexer

Call = Callable[[], Awaitable[object]]


async def _rate(call: Call, workers: int, seconds: float) -> float:
    """Calls per second completed by ``workers`` concurrent loops of ``call``."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await call()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return done / (time.monotonic() - started)


async def _bench(url: str, workers: int, seconds: float) -> None:
    source = resources.files("gateway.store").joinpath("lua", "authenticate.lua").read_text()
    record = f"kgbench{uuid.uuid4().hex[:8]}:k:{{{uuid.uuid4()}}}"
    digest = hashlib.sha256(b"bench-secret").hexdigest()
    fields: dict[FieldT, EncodableT] = {  # hset's own mapping type (redis-py 8 checks it)
        "hash": digest,
        "disabled": "0",
        "name": "bench",
        "scopes": '["chat:invoke"]',
    }
    fields |= {f"f{i}": "x" * 20 for i in range(12)}  # about a real record's size

    pooled = Redis.from_url(url, decode_responses=True, max_connections=workers)
    mux = RedisMultiplexer(url, connect_timeout=5, socket_timeout=5)
    try:
        await pooled.hset(record, mapping=fields)
        script = pooled.register_script(source)
        lua = LuaScript.from_source(source)

        async def via_redis_py() -> object:
            return await script(keys=[record], args=[digest])

        async def via_multiplexer() -> object:
            return await mux.evalsha(lua, [record], [digest])

        assert (await via_redis_py())[0] == "ok"  # type: ignore[index]
        assert (await via_multiplexer())[0] == "ok"  # type: ignore[index]
        await _rate(via_redis_py, workers, 0.5)  # warm up: fill the pool
        await _rate(via_multiplexer, workers, 0.5)
        before = (mux.stats.writes, mux.stats.commands)

        baseline = await _rate(via_redis_py, workers, seconds)
        coalesced = await _rate(via_multiplexer, workers, seconds)

        writes, commands = (mux.stats.writes - before[0], mux.stats.commands - before[1])
        print(f"{workers} workers x {seconds:g} s, EVALSHA authenticate.lua, {url}")
        print(f"  redis.asyncio (pool)      {baseline:10,.0f} calls/s")
        print(
            f"  RedisMultiplexer          {coalesced:10,.0f} calls/s  ({coalesced / baseline:.2f}x)"
        )
        print(f"  multiplexer batching      {commands / max(writes, 1):10.1f} commands per write")
        await pooled.delete(record)
    finally:
        await mux.close()
        await pooled.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--url", help="an existing server (default: start a private one)")
    options = parser.parse_args()
    if options.url:
        uvloop.run(_bench(options.url, options.workers, options.seconds))
        return
    with (
        tempfile.TemporaryDirectory(prefix="kgb", dir="/tmp") as root,
        EmbeddedRedis(Path(root)).start() as server,
    ):
        uvloop.run(_bench(server.url, options.workers, options.seconds))


if __name__ == "__main__":
    main()
