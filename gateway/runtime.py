"""Starting and stopping the Redis side: the embedded server or a URL, and the key store.

Kept free of aiohttp so that `keygate keys ...` starts fast."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from gateway.config.model import Settings
from gateway.config.reader import redact_url
from gateway.embedded import EmbeddedRedis
from gateway.store.availability import availability_of
from gateway.store.connection import STORE_ERRORS, connect, describe
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames

T = TypeVar("T")
log = logging.getLogger("keygate")
RETRY_EVERY = 1.0  # seconds between attempts to load the scripts while Redis is down


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
async def open_store(
    settings: Settings, url: str, *, strict: bool = False
) -> AsyncIterator[KeyStore]:
    """The key store on ``url``, its scripts loaded when Redis answers.

    ``strict`` (a ``keygate keys`` command): a Redis that does not answer raises its error
    (``describe`` says it in words). Otherwise (``serve``) the store is yielded anyway: a
    gateway that exits when its Redis is down only makes an orchestrator's restart loop.
    The reason is logged once, in words; ``/readyz`` answers 503 and requests follow
    ``redis.on_error`` meanwhile; the scripts are loaded in the background once Redis
    answers (every call also loads its script on NOSCRIPT, so nothing waits for that).
    """
    client = connect(settings.redis, url)
    loading: asyncio.Task[None] | None = None
    try:
        store = KeyStore(client, KeyNames(settings.redis.key_prefix), settings.keys.secret_prefix)
        if strict:
            await store.scripts.load()
        else:
            try:
                await _load(store, settings)
            except (*STORE_ERRORS, TimeoutError) as exc:
                words = describe(exc, settings.redis, url)
                availability_of(store).failed(
                    f"key store unavailable at start ({_shown(settings, url)}): {words}; "
                    "serving anyway: /readyz answers 503 and requests follow redis.on_error "
                    f"({settings.redis.on_error}) until it answers"
                )
                loading = asyncio.create_task(_load_when_answering(store, settings, url))
        yield store
    finally:
        if loading is not None:
            loading.cancel()
            # A cancellation inside redis-py's connect can come out as its own error.
            with contextlib.suppress(asyncio.CancelledError, *STORE_ERRORS):
                await loading
        await client.aclose()


async def _load(store: KeyStore, settings: Settings) -> None:
    """Load the scripts, bounded as a whole (the client bounds each call)."""
    redis = settings.redis
    calls = len(store.scripts.__slots__)
    async with asyncio.timeout(2 * redis.connect_timeout + calls * redis.socket_timeout):
        await store.scripts.load()


async def _load_when_answering(store: KeyStore, settings: Settings, url: str) -> None:
    """Try to load the scripts every RETRY_EVERY seconds until Redis answers."""
    while True:
        await asyncio.sleep(RETRY_EVERY)
        try:
            await _load(store, settings)
        except (*STORE_ERRORS, TimeoutError):
            continue  # said already: the availability logs changes, not each attempt
        availability_of(store).answered(
            f"key store answers again ({_shown(settings, url)}); its scripts are loaded"
        )
        return


def _shown(settings: Settings, url: str) -> str:
    """The store for a log line: its URL without any password, or the embedded server."""
    redis = settings.redis
    return f"embedded Redis in {redis.data_dir}" if redis.embedded else redact_url(url)
