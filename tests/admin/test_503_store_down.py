"""With Redis unreachable the admin API answers 503 + Retry-After quickly, never hangs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.admin.app import build_admin_app
from gateway.config.load import build
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames


async def test_unreachable_store_is_503_with_retry_after(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], tmp_path: Path
) -> None:
    url = f"unix://{tmp_path}/nothing-listens-here.sock"
    settings = build({"redis": {"url": url, "connect_timeout": 0.5}}, tmp_path)
    client = connect(settings.redis, url)
    store = KeyStore(client, KeyNames("kg:"), "kg_")
    http = await aiohttp_client(build_admin_app(settings, store))
    started = time.monotonic()
    response = await http.get("/v1/keys", headers={"Authorization": "Bearer kg_whatever-key"})
    assert time.monotonic() - started < 5
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    body = await response.json()
    assert body["code"] == "store_error" and "Traceback" not in await response.text()
    await client.aclose()
