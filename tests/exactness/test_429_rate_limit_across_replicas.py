"""429 across two replicas: a key's rate limit is one GCRA state in Redis, so two
``keygate serve`` processes together admit no more than the key's burst plus one request
per emission interval, however fast clients hit both."""

from __future__ import annotations

import asyncio
import math
import time

import aiohttp
from redis.asyncio import Redis

from gateway.store.record import RateLimitSpec
from tests.conftest import MakeKey, bearer
from tests.exactness.conftest import Replica, total_uses

BURST, PERIOD = 10, 2.0
INTERVAL = PERIOD / BURST  # one request per 0.2 s after the burst
RUN_FOR = 1.0
CLIENTS_PER_REPLICA = 8
POLICY = f'"key";q={BURST};w={PERIOD:g}'


async def test_two_replicas_together_admit_the_burst_plus_one_per_interval(
    replicas: tuple[Replica, Replica],
    make_key: MakeKey,
    client: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    issued = await make_key(rate_limit=RateLimitSpec(BURST, PERIOD))
    admitted = 0
    refused: list[dict[str, str]] = []  # the headers of every 429

    async def hammer(url: str, until: float) -> None:
        nonlocal admitted
        while time.monotonic() < until:
            async with client.get(url, headers=bearer(issued.secret)) as response:
                await response.read()
                assert response.status in (200, 429), response.status
                assert response.headers["RateLimit-Policy"] == POLICY
                if response.status == 200:
                    admitted += 1
                else:
                    refused.append(dict(response.headers))

    started = time.monotonic()
    await asyncio.gather(
        *(
            hammer(f"{replica.url}/c/free", started + RUN_FOR)
            for replica in replicas
            for _ in range(CLIENTS_PER_REPLICA)
        )
    )
    elapsed = time.monotonic() - started  # first send to last response

    assert BURST <= admitted <= BURST + math.ceil(elapsed / INTERVAL) + 1, (admitted, elapsed)
    assert refused, "the clients never went past the limit"
    for headers in refused:
        # Refused means the next slot is at most one interval (0.2 s) away: 1 s rounded up;
        # and the burst is full again in (1.8 s, 2 s]: 2 s rounded up.
        assert headers["Retry-After"] == "1"
        assert headers["RateLimit"] == '"key";r=0;t=2'
    # Only admitted requests count as uses.
    assert await total_uses(redis, key_prefix, issued.record.id) == admitted
