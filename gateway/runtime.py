"""Starting and stopping the Redis side: the embedded server or a URL, and the key store.

Kept free of aiohttp so that `keygate keys ...` starts fast."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from gateway.config.model import Settings
from gateway.embedded import EmbeddedRedis
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames

T = TypeVar("T")
log = logging.getLogger("keygate")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when installed (it is a dependency on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


def with_redis(settings: Settings, task: Callable[[str], Awaitable[T]], *, attach: bool) -> T:
    """Run ``task(redis_url)``, starting the embedded server around it when configured.

    The embedded server is started here, in the main thread, before the event loop: the
    kernel ties its life to this thread (see embedded._die_with_parent).
    """
    if not settings.redis.embedded:
        return run(_call(task, settings.redis.url))
    with EmbeddedRedis(settings.redis.data_dir).start(attach=attach) as server:
        return run(_call(task, server.url))


async def _call(task: Callable[[str], Awaitable[T]], url: str) -> T:
    return await task(url)


@contextlib.asynccontextmanager
async def open_store(settings: Settings, url: str) -> AsyncIterator[KeyStore]:
    client = connect(settings.redis, url)
    try:
        store = KeyStore(client, KeyNames(settings.redis.key_prefix), settings.keys.secret_prefix)
        await store.scripts.load()
        yield store
    finally:
        await client.aclose()
