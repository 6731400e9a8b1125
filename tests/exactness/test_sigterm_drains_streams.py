"""SIGTERM with 100 streams in flight on two replicas: ``keygate serve`` stops accepting,
lets every stream finish whole, writes every settlement, and exits 0; the usage is then
exactly what the upstream said the streams cost."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from redis.asyncio import Redis

from gateway.store.record import MICRO
from tests.conftest import MakeKey, bearer
from tests.exactness.conftest import Replica, assert_every_bucket, current_buckets, total_uses

STREAMS = 100
CHUNKS, INTERVAL = 10, 0.1  # about 1 s per stream
PER_TOKEN = MICRO // 1000  # the route's per_unit: 0.001


def _assert_whole_stream(body: bytes, tokens: int) -> None:
    """All CHUNKS content events, the usage event with ``tokens``, then [DONE], nothing cut."""
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]", body[-200:]
    payloads = [json.loads(event.removeprefix(b"data: ")) for event in events[:-2]]
    contents = [p["choices"][0]["delta"]["content"] for p in payloads[:-1]]
    assert contents == [f"w{i} " for i in range(CHUNKS)]
    assert payloads[-1]["usage"]["total_tokens"] == tokens


async def test_sigterm_lets_100_streams_finish_and_settles_each_exactly(
    replicas: tuple[Replica, Replica],
    make_key: MakeKey,
    client: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    issued = await make_key()
    buckets = await current_buckets(redis)
    tokens = [100 + n for n in range(STREAMS)]  # distinct, so a lost or doubled one shows
    streaming = 0
    all_streaming = asyncio.Event()
    finished = 0

    async def stream(url: str) -> tuple[int, bytes]:
        nonlocal streaming, finished
        async with client.get(url, headers=bearer(issued.secret)) as response:
            first = await response.content.readuntil(b"\n\n")
            streaming += 1
            if streaming == STREAMS:
                all_streaming.set()
            rest = await response.content.read()
            finished += 1
            return response.status, first + rest

    tasks = [
        asyncio.create_task(
            stream(f"{replicas[n % 2].url}/c/sse?tokens={t}&chunks={CHUNKS}&interval={INTERVAL}")
        )
        for n, t in enumerate(tokens)
    ]
    try:
        async with asyncio.timeout(10):
            await all_streaming.wait()
        in_flight = STREAMS - finished
        codes = await asyncio.gather(*(replica.terminate() for replica in replicas))
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    assert in_flight == STREAMS  # the signal came while every stream was still open
    assert codes == [0, 0]
    for (status, body), t in zip(results, tokens, strict=True):
        assert status == 200
        _assert_whole_stream(body, t)

    rid = issued.record.id
    await assert_every_bucket(redis, key_prefix, rid, buckets, sum(tokens) * PER_TOKEN)
    assert sum(tokens) * PER_TOKEN == 14_950_000
    assert await total_uses(redis, key_prefix, rid) == STREAMS
