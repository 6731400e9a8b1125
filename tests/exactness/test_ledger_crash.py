"""A gateway killed with SIGKILL while 100 requests of one key are in flight: each request's
reservation is in the key's ledger, and once their lease has ended the next request on the
key (here through another gateway) resolves them by ``reservations.on_expiry``: charged
(usage stays at the 100 reservations) or refunded (usage back to 0), counted in
``keygate_reservations_expired_total``, and the key shows nothing in flight any more."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.conftest import MakeKey, bearer
from tests.exactness.conftest import gateway_config, usage
from tests.procs import Serve, write_config

REQUESTS = 100
RESERVE = 0.01  # credits held per request; the upstream would say 0.001
LEASE = 2.0  # seconds
SLOW = "/c/slow?cost=0.001&delay=60"  # answers long after the gateway is gone


def _config(redis_url: str, key_prefix: str, upstream: str, on_expiry: str) -> dict[str, Any]:
    config = gateway_config(redis_url, key_prefix, upstream)
    slow: dict[str, Any] = {
        "name": "slow",
        "path": "/c/slow",
        "upstream": "costs",
        "rewrite": "/header",
    }
    slow |= {"cost": {"header": "X-Usage-Cost"}, "reserve": RESERVE}
    config["routes"] = [*config["routes"], slow]
    config["reservations"] = {"lease_seconds": LEASE, "on_expiry": on_expiry}
    return config


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(("on_expiry", "resolution"), [("charge", "charge"), ("refund", "refund")])
async def test_reservations_of_a_killed_gateway_are_resolved_after_their_lease(
    redis: Redis,
    redis_url: str,
    key_prefix: str,
    cost_upstream: str,
    make_key: MakeKey,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    on_expiry: str,
    resolution: str,
) -> None:
    # A cap over all time, which their reservations fill.
    issued = await make_key(limit_micro=REQUESTS * round(RESERVE * 1e6), limit_reset="total")
    viewer = await make_key(scopes=["apikeys:view"])
    key_id = issued.record.id
    configs = [_config(redis_url, key_prefix, cost_upstream, on_expiry) for _ in range(2)]
    doomed = Serve(write_config(tmp_path / "doomed.yaml", configs[0]), tmp_path)
    resolver = Serve(write_config(tmp_path / "resolver.yaml", configs[1]), tmp_path)
    try:
        doomed.wait_ready()
        resolver.wait_ready()
        doomed_url = f"http://{configs[0]['listen']}"
        resolver_url, admin_url = (f"http://{configs[1][k]}" for k in ("listen", "admin_listen"))

        async def key_view() -> dict[str, Any]:
            async with client.get(
                f"{admin_url}/v1/keys/{key_id}", headers=bearer(viewer.secret)
            ) as response:
                assert response.status == 200
                view: dict[str, Any] = await response.json()
                return view

        in_flight = [
            asyncio.ensure_future(client.get(doomed_url + SLOW, headers=bearer(issued.secret)))
            for _ in range(REQUESTS)
        ]
        # Every request reserved (the cap is full) and is waiting on the upstream.
        for _ in range(200):
            if await usage(redis, key_prefix, key_id, "t") == round(REQUESTS * RESERVE * 1e6):
                break
            await asyncio.sleep(0.05)
        view = await key_view()
        assert (view["in_flight"], view["reserved"]) == (REQUESTS, pytest.approx(1.0))
        async with client.get(resolver_url + SLOW, headers=bearer(issued.secret)) as refused:
            assert refused.status == 402  # the key is at its cap while they are in flight

        doomed.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(doomed.process.wait, 10)
        for request in in_flight:
            with contextlib.suppress(aiohttp.ClientError):
                (await request).close()
        await asyncio.sleep(LEASE + 0.5)  # their lease ends unsettled

        # The next request on the key resolves them (on any route, through any gateway).
        async with client.get(f"{resolver_url}/c/free", headers=bearer(issued.secret)) as free:
            assert free.status == 200
        view = await key_view()
        assert (view["in_flight"], view["reserved"]) == (0, 0.0)
        expected = REQUESTS * round(RESERVE * 1e6) if resolution == "charge" else 0
        assert await usage(redis, key_prefix, key_id, "t") == expected
        async with client.get(f"{admin_url}/metrics") as scraped:
            text = await scraped.text()
        name = f'keygate_reservations_expired_total{{resolution="{resolution}"}}'
        assert _metric(text, name) == REQUESTS, [ln for ln in text.splitlines() if "expired" in ln]
    finally:
        doomed.close()
        resolver.close()
