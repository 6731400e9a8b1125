"""Test session wiring: one real Redis-compatible server for the whole run.

The session starts a private server from the packaged binary (the same one keygate embeds),
unless KEYGATE_TEST_REDIS_URL names a server to use instead, or KEYGATE_TEST_REDIS=cluster
asks for a 3-primary Redis Cluster from the same binary (then the tests marked
``single_server`` are skipped: they use one server's own commands). Every test gets its own key
prefix and everything under it is deleted afterwards, so a shared server stays clean.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.admin.app import build_admin_app
from gateway.config.load import build
from gateway.config.model import Settings
from gateway.embedded import EmbeddedRedis
from gateway.store.connection import StoreClient, connect
from gateway.store.keystore import Issued, KeyStore
from gateway.store.names import KeyNames

ADMIN_SCOPES = ["*"]


def on_cluster() -> bool:
    return os.environ.get("KEYGATE_TEST_REDIS") == "cluster"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if on_cluster():
        skip = pytest.mark.skip(reason="one server's commands; KEYGATE_TEST_REDIS=cluster")
        for item in items:
            if item.get_closest_marker("single_server"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KEYGATE_TEST_REDIS_URL")
    if external:
        yield external
        return
    if on_cluster():
        from tests.topologies import start_cluster

        with start_cluster(tmp_path_factory.mktemp("cluster"), primaries=3) as cluster:
            yield cluster.url
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")).start() as server:
        yield server.url


@pytest.fixture
def key_prefix() -> str:
    return f"kgt{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    return build({"redis": {"url": redis_url, "key_prefix": key_prefix}}, tmp_path)


@pytest.fixture
async def redis(settings: Settings, redis_url: str) -> AsyncIterator[StoreClient]:
    client = connect(settings.redis, redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{settings.redis.key_prefix}*", count=1000)]
    if keys:  # redis-py splits a Cluster's DEL by slot
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def store(settings: Settings, redis: Redis) -> KeyStore:
    store = KeyStore(redis, KeyNames(settings.redis.key_prefix), settings.keys.secret_prefix)
    await store.scripts.load()
    return store


MakeKey = Callable[..., Awaitable[Issued]]


@pytest.fixture
def make_key(store: KeyStore) -> MakeKey:
    """Create a key straight in the store: ``await make_key(scopes=[...], workspace_id=...)``."""

    async def make(**values: Any) -> Issued:
        values.setdefault("workspace_id", "ws-a")
        values.setdefault("user_id", str(uuid.uuid4()))
        values["scopes"] = tuple(values.get("scopes", ()))
        return await store.create(values)

    return make


@pytest.fixture
async def admin_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    store: KeyStore,
) -> TestClient[Any, Any]:
    return await aiohttp_client(build_admin_app(settings, store))


def bearer(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}
