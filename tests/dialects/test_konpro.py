"""Konpro's ``GET /v1/api-keys`` (seeds/konpro-get-all-api-keys.txt): every key of the
caller's account with ``x-api-key``, in the seed's field names and types."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from tests.conftest import MakeKey
from tests.proxy.conftest import Gateway, StartGateway

FIELDS = {"key_id", "name", "scopes", "last_used", "created_at", "expires_at", "status"}


async def test_lists_the_callers_workspace_in_the_seed_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(name="lister", scopes=["apikeys:view"], workspace_id="ws-k")
    other = await make_key(
        name="prod",
        scopes=["read", "write"],
        workspace_id="ws-k",
        expires_at=int(time.time() * 1000) + 86_400_000,
    )
    off = await make_key(name="off", workspace_id="ws-k", disabled=True)
    await make_key(name="elsewhere", workspace_id="ws-other")
    async with http.get(
        f"{gateway.url}/v1/api-keys", headers={"x-api-key": caller.secret or ""}
    ) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    keys = {k["key_id"]: k for k in body["api_keys"]}
    assert set(keys) == {caller.record.id, other.record.id, off.record.id}
    for key in keys.values():
        assert set(key) == FIELDS
    prod = keys[other.record.id]
    assert prod["name"] == "prod"
    assert prod["scopes"] == ["read", "write"]
    assert prod["status"] == "active"
    assert prod["last_used"] is None
    assert prod["expires_at"].endswith("Z") and prod["created_at"].endswith("Z")
    assert keys[off.record.id]["status"] == "inactive"
    text = str(body)
    for issued in (caller, other, off):
        assert issued.secret is not None and issued.secret not in text


async def test_expired_keys_are_inactive(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-e")
    old = await make_key(workspace_id="ws-e", expires_at=int(time.time() * 1000) + 300)
    await asyncio.sleep(0.4)
    async with http.get(
        f"{gateway.url}/v1/api-keys", headers={"x-api-key": caller.secret or ""}
    ) as response:
        body = await response.json()
    status = {k["key_id"]: k["status"] for k in body["api_keys"]}
    assert status[old.record.id] == "inactive"


async def test_401_and_403_in_konpro_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    weak = await make_key(scopes=["read"])
    for headers, status in (
        ({}, 401),
        ({"x-api-key": "kg_not_a_key"}, 401),
        ({"x-api-key": weak.secret or ""}, 403),
    ):
        async with http.get(f"{gateway.url}/v1/api-keys", headers=headers) as response:
            assert response.status == status
            body = await response.json()
            assert set(body) == {"error"}
            assert set(body["error"]) == {"code", "message"}


async def test_the_path_can_be_moved_or_the_dialect_disabled(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"])
    moved = await start_gateway(dialects={"konpro": {"path": "/konpro/v1/api-keys"}})
    headers = {"x-api-key": caller.secret or ""}
    async with http.get(f"{moved.url}/konpro/v1/api-keys", headers=headers) as response:
        assert response.status == 200
    off = await start_gateway(dialects={"konpro": {"enabled": False}})
    async with http.get(f"{off.url}/v1/api-keys", headers=headers) as response:
        assert response.status == 404  # no dialect, no route: the proxy's own 404


async def test_a_route_the_dialect_shadows_is_named_at_startup(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caller = await make_key(scopes=["apikeys:view", "echo:read"])
    with caplog.at_level(logging.WARNING, logger="keygate.proxy"):
        gateway = await start_gateway(
            routes=[{"name": "everything", "prefix": "/v1", "upstream": "demo"}]
        )
    assert "GET /v1/api-keys (konpro, route everything)" in caplog.text
    headers = {"x-api-key": caller.secret or ""}
    async with http.get(f"{gateway.url}/v1/api-keys", headers=headers) as response:
        assert response.status == 200
        assert "api_keys" in await response.json()  # the dialect answered, not the upstream
