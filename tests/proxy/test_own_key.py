"""GET /v1/key on the proxy listener: the calling key's own record, its usage in each
period with each period's reset, limit_remaining and rate-limit state; never a secret."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import aiohttp

from gateway.store import secrets
from gateway.store.keystore import KeyStore
from gateway.store.record import RateLimitSpec, SpendCap
from gateway.usage.periods import FixedClock, to_ms
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    StartGateway,
    assert_problem,
    bad_checksum,
    sha256_hex,
)

SUNDAY_EVENING = datetime(2026, 11, 22, 20, 0, tzinfo=UTC)


async def test_the_calling_key_sees_its_usage_per_period_and_when_each_resets(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    clock = FixedClock(to_ms(SUNDAY_EVENING))
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key(
        name="svc",
        limit_micro=2_000_000,
        limit_reset="weekly",
        spend_caps=(SpendCap(600_000, "daily"),),
        rate_limit=RateLimitSpec(10, 60),
    )
    for path in ("/c/fixed", "/c/fixed", "/c/byok?cost=0.125"):
        async with http.get(f"{gateway.url}{path}", headers=bearer(issued.secret)) as r:
            assert r.status == 200
    await gateway.proxy.settlements.drain()
    async with http.get(f"{gateway.url}/v1/key", headers=bearer(issued.secret)) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        text = await r.text()
        data = (await r.json())["data"]
    assert issued.secret not in text
    assert data["id"] == issued.record.id and data["name"] == "svc"
    assert data["usage"] == data["usage_daily"] == data["usage_weekly"] == 0.5
    assert data["usage_monthly"] == 0.5
    assert data["byok_usage"] == data["byok_usage_daily"] == 0.125
    assert data["limit"] == 2.0 and data["limit_remaining"] == 1.5
    assert data["usage_resets_at"] == {
        "daily": "2026-11-23T00:00:00.000Z",
        "weekly": "2026-11-23T00:00:00.000Z",  # Monday 00:00 UTC
        "monthly": "2026-12-01T00:00:00.000Z",
    }
    assert data["caps"] == [
        {"name": "limit", "amount": 2.0, "period": "weekly", "used": 0.5, "remaining": 1.5,
         "resets_at": "2026-11-23T00:00:00.000Z"},
        {"name": "spend_caps[0]", "amount": 0.6, "period": "daily", "used": 0.5,
         "remaining": 0.1, "resets_at": "2026-11-23T00:00:00.000Z"},
    ]
    assert data["rate_limit_state"]["requests"] == 10
    assert data["rate_limit_state"]["remaining"] == 7
    assert data["total_uses"] == 3
    assert data["last_used_at"] == "2026-11-22T20:00:00.000Z"

    clock.set(datetime(2026, 11, 23, 0, 0, tzinfo=UTC))  # Monday: day and week roll over
    async with http.get(f"{gateway.url}/v1/key", headers=bearer(issued.secret)) as r:
        data = (await r.json())["data"]
    assert data["usage_daily"] == data["usage_weekly"] == 0.0
    assert data["usage_monthly"] == data["usage"] == 0.5
    assert data["limit_remaining"] == 2.0


async def test_own_key_is_free_and_unlimited(
    cost_gateway: Gateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    issued = await make_key(rate_limit=RateLimitSpec(1, 60), limit_micro=0)
    for _ in range(3):
        async with http.get(f"{cost_gateway.url}/v1/key", headers=bearer(issued.secret)) as r:
            assert r.status == 200
            data = (await r.json())["data"]
    assert data["total_uses"] == 0
    assert data["rate_limit_state"]["remaining"] == 1


async def test_own_key_refuses_missing_unknown_disabled_and_expired_keys(
    cost_gateway: Gateway, make_key: MakeKey, store: KeyStore, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{cost_gateway.url}/v1/key") as r:
        await assert_problem(r, 401, "missing_key")
    async with http.get(f"{cost_gateway.url}/v1/key", headers=bearer("kg_nope")) as r:
        await assert_problem(r, 401, "invalid_key")
    issued = await make_key()
    await store.update(issued.record.id, {"disabled": True})
    async with http.get(f"{cost_gateway.url}/v1/key", headers=bearer(issued.secret)) as r:
        await assert_problem(r, 403, "disabled")
    await store.revoke(issued.record.id)
    async with http.get(f"{cost_gateway.url}/v1/key", headers=bearer(issued.secret)) as r:
        await assert_problem(r, 401, "invalid_key")


async def test_own_key_after_rotation_accepts_the_grace_secret(
    cost_gateway: Gateway, make_key: MakeKey, store: KeyStore, http: aiohttp.ClientSession
) -> None:
    issued = await make_key()
    rotated = await store.rotate(issued.record.id, grace_seconds=60)
    assert rotated is not None and rotated.secret is not None
    for secret in (issued.secret, rotated.secret):
        async with http.get(f"{cost_gateway.url}/v1/key", headers=bearer(secret)) as r:
            assert r.status == 200
            assert (await r.json())["data"]["label"] == rotated.record.label


async def test_last_used_at_is_kept_to_the_second(
    start_cost_gateway: object, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    clock = FixedClock(to_ms(SUNDAY_EVENING))
    gateway: Gateway = await start_cost_gateway(clock=clock)  # type: ignore[operator]
    issued = await make_key()
    seen = []
    for step in (0, 999, 1, 5000):
        clock.advance(step)
        async with http.get(f"{gateway.url}/c/free", headers=bearer(issued.secret)) as r:
            assert r.status == 200
        async with http.get(f"{gateway.url}/v1/key", headers=bearer(issued.secret)) as r:
            seen.append((await r.json())["data"]["last_used_at"])
    assert seen == [
        "2026-11-22T20:00:00.000Z",
        "2026-11-22T20:00:00.000Z",  # 999 ms later: the same second's record stands
        "2026-11-22T20:00:01.000Z",
        "2026-11-22T20:00:06.000Z",
    ]


async def test_a_mistyped_keygate_secret_imported_by_hash_is_refused_here_as_on_routes(
    start_gateway: StartGateway, store: KeyStore, http: aiohttp.ClientSession
) -> None:
    """The routes refuse a keygate-shaped secret with a bad checksum without asking Redis;
    GET /v1/key and the dialects follow the same rule, even for a key whose hash was
    imported (the import could not tell)."""
    gateway = await start_gateway(dialects={"openrouter": {"enabled": True}})
    mistyped = bad_checksum(secrets.generate("kg_"))
    await store.create(
        {
            "workspace_id": "ws-a",
            "user_id": str(uuid.uuid4()),
            "scopes": (*ECHO_SCOPES, "apikeys:view"),
        },
        sha256=sha256_hex(mistyped),
    )
    async with http.get(f"{gateway.url}/echo/x", headers=bearer(mistyped)) as r:
        await assert_problem(r, 401, "invalid_key")
    async with http.get(f"{gateway.url}/v1/key", headers=bearer(mistyped)) as r:
        await assert_problem(r, 401, "invalid_key")
    async with http.get(f"{gateway.url}/api/v1/keys", headers=bearer(mistyped)) as r:
        assert r.status == 401  # the OpenRouter dialect, in its own error shape
