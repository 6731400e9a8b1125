"""Starting and stopping keygate's parts: the Redis connection (embedded or not), the
key store and the listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from gateway.admin.app import build_admin_app
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


async def serve(settings: Settings, url: str) -> None:
    """Serve the admin listener until SIGTERM or SIGINT, then stop in order."""
    async with open_store(settings, url) as store:
        runner = web.AppRunner(
            build_admin_app(settings, store), access_log=None, handle_signals=False
        )
        await runner.setup()
        admin = settings.admin_listen
        site = web.TCPSite(runner, admin.host, admin.port, reuse_address=True)
        await site.start()
        log.info("admin listener on %s", _bound(runner) or admin)
        if settings.routes:
            log.warning("routes are configured, but the proxy listener is not in this release")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            await runner.cleanup()


def _bound(runner: web.AppRunner) -> str | None:
    addresses = [f"{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple)]
    return ", ".join(addresses) or None
