"""The listeners of `keygate serve`: proxy and admin, started and stopped in order."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import sockets
from gateway.admin import metrics_endpoint
from gateway.admin.app import build_admin_app
from gateway.admin.reload import Reload
from gateway.app import build_proxy, proxy_server
from gateway.config.model import Address, Settings
from gateway.config.reloadable import ReloadResult
from gateway.forward_auth.wire import AuthListener
from gateway.listener import operator_runner
from gateway.proxy.live import LiveProxy, Reread
from gateway.runtime import open_store
from gateway.store.cluster_multiplex import multiplexer_for
from gateway.store.keystore import KeyStore
from gateway.workers import WORKER_ENV, report_ready

log = logging.getLogger("keygate")


async def serve(
    settings: Settings,
    url: str,
    on_ready: Callable[[KeyStore], Awaitable[None]] | None = None,
    *,
    listening: sockets.Listening | None = None,
    reread: Reread | None = None,
) -> None:
    """Serve the proxy and admin listeners until SIGTERM or SIGINT, then stop in order:
    stop accepting, let in-flight requests finish, close upstream pools and Redis.

    ``on_ready`` runs once both listeners accept connections (the demo prints its help).
    ``listening``: the listeners' sockets, bound already (gateway/sockets.py); without
    it they are bound here.
    ``reread`` reads the config file again: SIGHUP and POST /v1/admin/reload reload with
    it (gateway/proxy/live.py); without it a reload is refused.
    """
    async with open_store(settings, url) as store:
        multiplexer = multiplexer_for(settings.redis, url)
        proxy = build_proxy(settings, multiplexer, store=store)
        await proxy.start()
        live = LiveProxy(proxy, reread)
        supervisor = _supervisor_pid()
        grace = settings.shutdown_timeout  # for requests in flight when stopping
        proxy_runner = web.ServerRunner(
            proxy_server(live), handle_signals=False, shutdown_timeout=grace
        )
        admin_app = build_admin_app(
            settings,
            store,
            proxy.metrics,
            readiness=multiplexer.ping,
            reloader=live.reload if supervisor is None else _signalling(live, supervisor),
        )
        admin_runner = operator_runner(admin_app, settings, proxy.metrics, shutdown_timeout=grace)
        listeners: list[tuple[web.BaseRunner, Address, str]] = [
            (proxy_runner, settings.listen, "proxy"),
            (admin_runner, settings.admin_listen, "admin"),
        ]
        if settings.metrics.listen is not None:  # /metrics alone, for a scraper's network
            metrics_app = web.Application()
            metrics_endpoint.add_routes(metrics_app, proxy.metrics)
            metrics_runner = operator_runner(
                metrics_app, settings, proxy.metrics, shutdown_timeout=grace, listener="metrics"
            )
            listeners.append((metrics_runner, settings.metrics.listen, "metrics"))
        # Forward auth for nginx, Traefik, Caddy, Envoy: its own server (wire.py).
        auth = AuthListener(live) if settings.auth_listen is not None else None
        # Signals are handled before the supervisor hears "serving": a SIGTERM or SIGHUP
        # that follows it at once must stop or reload, not kill the process outright.
        signals = _Signals(live)
        try:
            if listening is None:
                listening = sockets.bind(settings)
            for runner, address, name in listeners:
                await runner.setup()
                # A worker serves what its supervisor bound at start; a listener added to
                # the file since then waits for a restart.
                for sock in listening.get(name, []):
                    await web.SockSite(runner, sock, backlog=sockets.BACKLOG).start()
                if runner.sites:
                    log.info("%s listener on %s", name, _bound(runner) or address)
            if auth is not None and listening.get("auth"):
                await auth.start(listening["auth"])
                log.info("auth listener on %s", ", ".join(auth.addresses))
            report_ready()  # to the supervisor, when this process is one of its workers
            # Everything built at startup lives until exit: keep it out of the cyclic
            # collector's sweeps, which otherwise rescan it on every full collection.
            gc.collect()
            gc.freeze()
            if on_ready is not None:
                await on_ready(store)
            await signals.stopped()
        finally:
            signals.remove()
            log.info("stopping")
            # Every listener stops accepting at once; each lets its requests finish.
            closing = [runner.cleanup() for runner, _, _ in listeners]
            if auth is not None:
                closing.append(auth.close(grace))
            await asyncio.gather(*closing)
            await live.close()
            await multiplexer.close()


class _Signals:
    """SIGTERM and SIGINT stop the server; each SIGHUP reloads the config."""

    def __init__(self, live: LiveProxy) -> None:
        self.live = live
        self.stop = asyncio.Event()
        self.reloads: set[asyncio.Task[ReloadResult]] = set()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)

    def _reload(self) -> None:
        task = asyncio.create_task(self.live.reload())  # logs its own outcome
        self.reloads.add(task)
        task.add_done_callback(self.reloads.discard)

    async def stopped(self) -> None:
        """Until SIGTERM or SIGINT, and any reload under way has finished."""
        await self.stop.wait()
        if self.reloads:
            await asyncio.gather(*self.reloads, return_exceptions=True)

    def remove(self) -> None:
        """While stopping, a SIGHUP reloads nothing (and still does not kill); SIGTERM
        and SIGINT keep setting ``stop``, so a second one changes nothing."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _ignored_while_stopping)


def _ignored_while_stopping() -> None:
    log.info("SIGHUP while stopping: no reload")


def _supervisor_pid() -> int | None:
    """The supervisor's pid when this process is one of its workers."""
    pid = os.environ.get(WORKER_ENV)
    return int(pid) if pid and pid.isdigit() else None


def _signalling(live: LiveProxy, supervisor: int) -> Reload:
    """A worker's POST /v1/admin/reload: check the config here, then have the supervisor
    signal every worker (this one included), so that all of them switch, not one."""

    async def reload() -> ReloadResult:
        checked = await live.check()
        if checked.ok:
            os.kill(supervisor, signal.SIGHUP)
            return dataclasses.replace(checked, status="signalled")
        return checked

    return reload


def _bound(runner: web.BaseRunner) -> str | None:
    addresses = [f"{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple)]
    return ", ".join(addresses) or None
