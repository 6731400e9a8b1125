"""The proxy a listener serves, switchable at run time: a config reload builds the next
generation and switches new requests to it in one assignment, while requests already
running finish on the generation they started on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import ConfigError
from gateway.config.model import Settings
from gateway.config.reloadable import ReloadResult, reloaded, restart_needed
from gateway.metrics import Metrics
from gateway.proxy.service import Proxy

log = logging.getLogger("keygate")

# Reads and validates the config file again (blocking: it is run in a thread); raises
# ConfigError with one line per problem.
Reread = Callable[[], Settings]


@dataclass
class LiveProxy:
    """The serving generation of the proxy, and the reload that replaces it."""

    current: Proxy
    reread: Reread | None = None
    generation: int = 1
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def metrics(self) -> Metrics:
        return self.current.metrics

    @property
    def settings(self) -> Settings:
        return self.current.settings

    def handle(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """The listener's handler: the request runs wholly on the generation serving at
        its arrival (a plain call, no extra coroutine frame on the hot path)."""
        return self.current.handle(request)

    async def reload(self) -> ReloadResult:
        """Read the config again; if it is valid, serve new requests from it. An invalid
        config changes nothing: the result carries its problems, which are logged too.
        Reloads run one at a time."""
        async with self._lock:
            return await self._reload()

    async def check(self) -> ReloadResult:
        """Read and validate the config without switching to it (the problems, if any,
        and the restart-only options that changed)."""
        running = self.current.settings
        try:
            read = await self._read()
        except ConfigError as exc:
            return ReloadResult(problems=tuple(exc.problems))
        return ReloadResult(
            restart_needed=tuple(restart_needed(running, read)),
            routes=len(read.routes),
            upstreams=len(read.upstreams),
            generation=self.generation,
        )

    async def _read(self) -> Settings:
        if self.reread is None:
            raise ConfigError(["this gateway was started without a config to reload"])
        return await asyncio.to_thread(self.reread)

    async def _reload(self) -> ReloadResult:
        running = self.current
        try:
            read = await self._read()
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused, the running config stays: %s", line)
            return ReloadResult(problems=tuple(exc.problems))
        later = restart_needed(running.settings, read)
        for option in later:
            log.warning("reload: %s changed; it takes effect at the next restart", option)
        successor = running.successor(reloaded(running.settings, read))
        successor.start_sessions()
        self.current = successor  # new requests start here from now on
        self.generation += 1
        retiring = asyncio.create_task(running.retire())
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        log.info(
            "reloaded: %d routes, %d upstreams (config generation %d)",
            len(read.routes),
            len(read.upstreams),
            self.generation,
        )
        return ReloadResult(
            restart_needed=tuple(later),
            routes=len(read.routes),
            upstreams=len(read.upstreams),
            generation=self.generation,
        )

    async def close(self) -> None:
        """Stop: the serving generation closes (settlements drained, pools closed) after
        the generations being retired have closed theirs."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.current.close()
