"""max_in_flight across replicas: two ``keygate serve`` processes on one Redis, in front
of an upstream that holds every request until the test opens its gate and counts how many
it holds at once. A key allowed 5 in flight never has more than 5 at the upstream, however
its 30 concurrent requests are spread over the replicas; the others are refused at once
with 429 ``concurrency_limited`` and ``Retry-After: 1``, and the slots free when the
requests end. A killed replica's slots free when their lease ends."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.conftest import MakeKey, bearer
from tests.exactness.conftest import gateway_config, module_upstream
from tests.procs import Serve, write_config

LIMIT = 5
REQUESTS = 30
LEASE = 2.0  # seconds: the lease of the killed replica's requests


@pytest.fixture
def gated_upstream(tmp_path: Path) -> Iterator[str]:
    """tests/exactness/gated.py in its own process; yields its base URL."""
    with module_upstream("tests.exactness.gated", tmp_path / "gated.err") as url:
        yield url


def _config(redis_url: str, key_prefix: str, upstream: str, lease: float = LEASE) -> dict[str, Any]:
    config = gateway_config(redis_url, key_prefix, upstream)
    config["upstreams"] = {"gated": {"url": upstream, "pool_size": 100}}
    config["routes"] = [
        # No cost rule: only max_in_flight gives these requests a ledger entry.
        {"name": "hold", "path": "/c/hold", "upstream": "gated", "rewrite": "/hold"},
        {
            "name": "held_costed",
            "path": "/c/held_costed",
            "upstream": "gated",
            "rewrite": "/hold",
            "cost": {"fixed": 0.01},
        },
        {"name": "ws", "path": "/c/ws", "upstream": "gated", "rewrite": "/ws", "websocket": True},
        {"name": "quick", "path": "/c/quick", "upstream": "gated", "rewrite": "/stats"},
    ]
    config["reservations"] = {"lease_seconds": lease}
    return config


async def _stats(client: aiohttp.ClientSession, upstream: str) -> dict[str, int]:
    async with client.get(f"{upstream}/stats") as response:
        stats: dict[str, int] = await response.json()
        return stats


async def _open(client: aiohttp.ClientSession, upstream: str, gate: str) -> None:
    async with client.get(f"{upstream}/open", params={"gate": gate}) as response:
        assert response.status == 200


async def _get(client: aiohttp.ClientSession, url: str, secret: str | None) -> tuple[int, Any, str]:
    async with client.get(url, headers=bearer(secret)) as response:
        body = await response.json(content_type=None)
        return response.status, body, response.headers.get("Retry-After", "")


async def _until(check: Any, what: str) -> None:
    """Poll ``check()`` until true; the bound is only a safety net."""
    for _ in range(600):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


@pytest.mark.parametrize("route", ["hold", "held_costed"])
async def test_a_key_never_has_more_than_max_in_flight_at_the_upstream(
    redis: Redis,
    redis_url: str,
    key_prefix: str,
    gated_upstream: str,
    make_key: MakeKey,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    route: str,
) -> None:
    issued = await make_key(max_in_flight=LIMIT)
    configs = [_config(redis_url, key_prefix, gated_upstream) for _ in range(2)]
    serves = [
        Serve(write_config(tmp_path / f"g{n}.yaml", c), tmp_path) for n, c in enumerate(configs)
    ]
    try:
        for serve in serves:
            serve.wait_ready()
        urls = [f"http://{c['listen']}/c/{route}" for c in configs]
        requests = [
            asyncio.ensure_future(_get(client, f"{urls[i % 2]}?gate=one", issued.secret))
            for i in range(REQUESTS)
        ]
        # Those refused answer at once; those admitted wait at the upstream's gate.
        await _until(lambda: _done_count(requests, REQUESTS - LIMIT), "25 answers while 5 are held")
        await _until(
            lambda: _holds(client, gated_upstream, LIMIT), "the admitted 5 at the upstream"
        )
        await _open(client, gated_upstream, "one")
        answers = await asyncio.gather(*requests)
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200] * LIMIT + [429] * (REQUESTS - LIMIT), answers
        for status, body, retry_after in answers:
            if status == 429:
                assert body["code"] == "concurrency_limited", body
                assert retry_after == "1"
        stats = await _stats(client, gated_upstream)
        assert stats["max"] <= LIMIT and stats["total"] == LIMIT, stats

        # Every slot is free again: 5 more at once, through both replicas, all admitted.
        again = [
            asyncio.ensure_future(_get(client, f"{urls[i % 2]}?gate=two", issued.secret))
            for i in range(LIMIT)
        ]
        await _until(lambda: _holds(client, gated_upstream, LIMIT), "5 more at the upstream")
        await _open(client, gated_upstream, "two")
        assert [status for status, _, _ in await asyncio.gather(*again)] == [200] * LIMIT
        assert (await _stats(client, gated_upstream))["max"] <= LIMIT
    finally:
        for serve in serves:
            serve.close()


async def _done_count(requests: Sequence[asyncio.Future[Any]], count: int) -> bool:
    return sum(request.done() for request in requests) >= count


async def _holds(client: aiohttp.ClientSession, upstream: str, count: int) -> bool:
    return (await _stats(client, upstream))["current"] >= count


async def test_a_killed_replicas_slots_free_when_their_lease_ends(
    redis: Redis,
    redis_url: str,
    key_prefix: str,
    gated_upstream: str,
    make_key: MakeKey,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    issued = await make_key(max_in_flight=LIMIT)
    configs = [_config(redis_url, key_prefix, gated_upstream) for _ in range(2)]
    doomed, survivor = (
        Serve(write_config(tmp_path / f"g{n}.yaml", c), tmp_path) for n, c in enumerate(configs)
    )
    try:
        doomed.wait_ready()
        survivor.wait_ready()
        doomed_url, survivor_url = (f"http://{c['listen']}/c/hold" for c in configs)
        held = [
            asyncio.ensure_future(_get(client, f"{doomed_url}?gate=never", issued.secret))
            for _ in range(LIMIT)
        ]
        await _until(lambda: _holds(client, gated_upstream, LIMIT), "5 held by the doomed one")
        status, body, retry_after = await _get(client, f"{survivor_url}?gate=x", issued.secret)
        assert (status, body["code"], retry_after) == (429, "concurrency_limited", "1")

        doomed.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(doomed.process.wait, 10)
        for request in held:
            with contextlib.suppress(aiohttp.ClientError):
                await request
        await _open(client, gated_upstream, "after")

        # Once the lease has ended, the next request on the key is admitted.
        async def admitted() -> bool:
            found, _, _ = await _get(client, f"{survivor_url}?gate=after", issued.secret)
            assert found in (200, 429)
            return found == 200

        await _until(admitted, "a request admitted after the killed replica's lease ended")
    finally:
        doomed.close()
        survivor.close()


async def test_a_websocket_holds_a_slot_until_it_closes(
    redis: Redis,
    redis_url: str,
    key_prefix: str,
    gated_upstream: str,
    make_key: MakeKey,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A WebSocket session is one request in flight; its settlement (at 0: the route charges
    nothing) frees the slot when it closes, long before its lease (300 s here) ends."""
    issued = await make_key(max_in_flight=1)
    config = _config(redis_url, key_prefix, gated_upstream, lease=300.0)
    with_socket = Serve(write_config(tmp_path / "g.yaml", config), tmp_path)
    try:
        with_socket.wait_ready()
        base = f"http://{config['listen']}/c"
        async with client.ws_connect(f"{base}/ws", headers=bearer(issued.secret)) as socket:
            await socket.send_str("ping")
            assert (await socket.receive(timeout=10)).data == "ping"
            status, body, retry_after = await _get(client, f"{base}/quick", issued.secret)
            assert (status, body["code"], retry_after) == (429, "concurrency_limited", "1")

        async def admitted() -> bool:
            found, _, _ = await _get(client, f"{base}/quick", issued.secret)
            assert found in (200, 429)
            return found == 200

        await _until(admitted, "a request admitted once the WebSocket closed")
    finally:
        with_socket.close()
