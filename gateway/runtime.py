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
from gateway.app import build_proxy, proxy_server
from gateway.config.model import Settings
from gateway.embedded import EmbeddedRedis
from gateway.proxy.authorize import KeyAuthorizer
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.multiplex import RedisMultiplexer
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


async def serve(
    settings: Settings, url: str, on_ready: Callable[[KeyStore], Awaitable[None]] | None = None
) -> None:
    """Serve the proxy and admin listeners until SIGTERM or SIGINT, then stop in order:
    stop accepting, let in-flight requests finish, close upstream pools and Redis.

    ``on_ready`` runs once both listeners accept connections (the demo prints its help).
    """
    async with open_store(settings, url) as store:
        multiplexer = RedisMultiplexer(
            url,
            connect_timeout=settings.redis.connect_timeout,
            socket_timeout=settings.redis.socket_timeout,
        )
        proxy = build_proxy(
            settings,
            KeyAuthorizer(
                multiplexer, KeyNames(settings.redis.key_prefix), settings.keys.hash_cache_size
            ),
        )
        await proxy.start()
        proxy_runner = web.ServerRunner(proxy_server(proxy), handle_signals=False)
        admin_runner = web.AppRunner(
            build_admin_app(settings, store), access_log=None, handle_signals=False
        )
        try:
            for runner, address, name in (
                (proxy_runner, settings.listen, "proxy"),
                (admin_runner, settings.admin_listen, "admin"),
            ):
                await runner.setup()
                await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
                log.info("%s listener on %s", name, _bound(runner) or address)
            if on_ready is not None:
                await on_ready(store)
            await _until_signalled()
        finally:
            log.info("stopping")
            await proxy_runner.cleanup()
            await admin_runner.cleanup()
            await proxy.close()
            await multiplexer.close()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _bound(runner: web.BaseRunner) -> str | None:
    addresses = [f"{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple)]
    return ", ".join(addresses) or None
