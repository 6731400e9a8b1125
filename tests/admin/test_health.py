"""/healthz and /readyz on the admin listener: no auth, cheap, and a 503 that says why.

The script-flush test runs its own embedded server: SCRIPT FLUSH on the session's shared
server would pull the scripts from under every other test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.admin.app import build_admin_app
from gateway.config.load import build
from gateway.embedded import EmbeddedRedis
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames
from tests.procs import short_tmpdir

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


async def test_healthz_is_200_ok_without_a_key(admin_client: TestClient[Any, Any]) -> None:
    response = await admin_client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_is_200_ready_against_a_live_redis(
    admin_client: TestClient[Any, Any],
) -> None:
    response = await admin_client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}


async def test_healthz_answers_while_redis_is_unreachable(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    url = f"unix://{tmp_path}/nothing-listens-here.sock"
    settings = build({"redis": {"url": url}}, tmp_path)
    client = connect(settings.redis, url)
    http = await aiohttp_client(build_admin_app(settings, KeyStore(client, KeyNames("kg:"), "kg_")))
    response = await http.get("/healthz")
    assert (response.status, await response.json()) == (200, {"status": "ok"})
    await client.aclose()


async def test_readyz_is_503_when_redis_is_unreachable(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    # A password in the URL must not reach the body.
    url = f"unix://:hunter2-secret@{tmp_path}/nothing-listens-here.sock"
    settings = build({"redis": {"url": url, "connect_timeout": 0.5}}, tmp_path)
    client = connect(settings.redis, url)
    http = await aiohttp_client(build_admin_app(settings, KeyStore(client, KeyNames("kg:"), "kg_")))
    started = time.monotonic()
    response = await http.get("/readyz")
    assert time.monotonic() - started < settings.redis.socket_timeout + 1
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    text = await response.text()
    assert await response.json() == {"status": "unavailable", "reason": "redis unreachable"}
    assert "hunter2" not in text and "nothing-listens-here" not in text
    await client.aclose()


async def test_readyz_is_503_when_the_scripts_are_not_loaded_then_reloads_them(
    aiohttp_client: Client,
) -> None:
    with short_tmpdir() as root, EmbeddedRedis(root / "redis").start() as server:
        settings = build({"redis": {"url": server.url}}, root)
        client = connect(settings.redis, server.url)
        store = KeyStore(client, KeyNames("kg:"), "kg_")
        await store.scripts.load()
        http = await aiohttp_client(build_admin_app(settings, store))
        assert (await http.get("/readyz")).status == 200

        await client.script_flush()
        response = await http.get("/readyz")
        assert response.status == 503
        assert await response.json() == {"status": "unavailable", "reason": "scripts not loaded"}

        # The probe started a reload, so the replica becomes ready without traffic.
        deadline = time.monotonic() + 5
        while (response := await http.get("/readyz")).status != 200:
            assert time.monotonic() < deadline, await response.text()
            await asyncio.sleep(0.02)
        assert await response.json() == {"status": "ready"}
        await http.close()
        await client.aclose()
