"""``keygate serve --workers N``: N worker processes sharing the listeners.

Each worker is a whole ``keygate serve`` (its own event loop, Redis connections and
upstream pools). This process only supervises:

- it has bound the proxy, admin and metrics ports before it starts (gateway/sockets.py:
  a taken port stops it there), and every worker inherits those very sockets and accepts
  on them, so the kernel spreads connections over the workers and over nothing else;
- it starts the embedded Redis, if configured, once, and hands its URL to the workers;
- it gives the workers one prometheus-client multiprocess directory, so any worker's
  ``/metrics`` sums all of them, and marks a dead worker's files as dead;
- a worker says when its listeners serve (one byte on a pipe, ``KEYGATE_READY_FD``). One
  that exits before that failed at boot: the supervisor stops the others and exits 1,
  since a replacement would fail the same way;
- a worker that exits later while nobody asked it to is replaced (with a growing pause
  while replacements die young, so a crashing worker does not spin);
- on SIGTERM or SIGINT it passes SIGTERM on (to a worker being spawned at that moment
  too), waits up to ``shutdown_timeout`` (plus a margin) for the workers to finish their
  requests and settlements, kills any that did not, and exits 0 only if every worker
  exited 0 (or was ended by that SIGTERM before it served) and none failed at boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway import sockets
from gateway.config import ConfigError
from gateway.config.model import Settings
from gateway.embedded import die_with_parent

log = logging.getLogger("keygate")

WORKER_ENV = "KEYGATE_WORKER_OF"  # set in a worker: the supervisor's pid (not an option)
READY_ENV = "KEYGATE_READY_FD"  # set in a worker: the pipe it says "serving" on (not an option)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_YOUNG = 5.0  # seconds: a worker dying sooner than this after its start died young
_MAX_PAUSE = 10.0
_MARGIN = 5.0  # seconds beyond shutdown_timeout before a worker is killed


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def report_ready() -> None:
    """In a worker, once its listeners serve: one byte on the supervisor's pipe (once).
    Elsewhere nothing."""
    fd = os.environ.pop(READY_ENV, "")
    if fd.isdigit():
        with contextlib.suppress(OSError):  # a supervisor gone already hears nothing
            os.write(int(fd), b"1")
            os.close(int(fd))


class Supervisor:
    """Runs ``settings.workers`` workers on ``listening`` until SIGTERM or SIGINT, or
    until one fails at boot; ``run()`` returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        config: str | None,
        redis_url: str,
        listening: sockets.Listening,
        check: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.redis_url = redis_url
        self.listening = listening  # bound by the caller, inherited by every worker
        self.stopping = False
        self.failed = False  # a worker failed at boot: exit 1
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.codes: list[int] = []
        self._own_dir: str | None = None
        self._stop = asyncio.Event()
        self.check = check  # reads and validates the config file (raises ConfigError)
        self._reloads: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            directory = self._own_dir = tempfile.mkdtemp(prefix="keygate-metrics-")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        for name, _, _ in sockets.listeners(self.settings):
            for sock in self.listening[name]:
                log.info("%s listener bound on %s", name, _address(sock))
        try:
            keepers = [
                asyncio.create_task(self._keep(index, directory))
                for index in range(self.settings.workers)
            ]
            log.info("supervising %d workers", self.settings.workers)
            await self._stop.wait()
            await self._stop_all(keepers)
        finally:
            sockets.close(self.listening)
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)
        if self.failed:
            return 1
        return 0 if all(code == 0 for code in self.codes) else 1

    def _reload(self) -> None:
        if not self.stopping:
            task = asyncio.create_task(self._check_and_tell_workers())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def _check_and_tell_workers(self) -> None:
        """SIGHUP: check the config once here (one log line per problem, not one per
        worker); if it is valid, SIGHUP every worker, each of which reloads it."""
        if self.check is not None:
            try:
                await asyncio.to_thread(self.check)
            except ConfigError as exc:
                for line in exc.problems:
                    log.error("reload refused, the running config stays: %s", line)
                return
        for process in list(self.workers.values()):
            _signal(process, signal.SIGHUP)
        log.info("reload: %d workers told", len(self.workers))

    def _request_stop(self) -> None:
        # Set at once (not when run() next wakes), so that no keeper starts a worker
        # after this point without seeing it.
        self.stopping = True
        self._stop.set()

    async def _keep(self, index: int, directory: str) -> None:
        """Keep worker ``index`` running until the supervisor stops; return once the
        worker it last started has exited."""
        pause = 0.5
        while not self.stopping:
            started = time.monotonic()
            try:
                process, ready = await self._spawn(directory)
            except OSError as exc:
                log.error("worker %d could not be started: %s", index, exc.strerror or exc)
                self.failed = True
                self._request_stop()
                return
            self.workers[process.pid] = process
            if self.stopping:  # the stop came while it was spawned: _stop_all missed it
                _signal(process, signal.SIGTERM)
            served = await _readiness(ready)  # False: it exited (or gave up) before serving
            if served:
                log.info("worker %d (pid %d) serving", index, process.pid)
            code = await process.wait()
            del self.workers[process.pid]
            _mark_dead(process.pid, directory)
            if self.stopping:
                # Ended by our SIGTERM before it had its handler in place: a clean stop.
                self.codes.append(0 if code == -signal.SIGTERM else code)
                return
            if not served:
                log.error(
                    "worker %d (pid %d) failed at boot with code %d", index, process.pid, code
                )
                self.failed = True
                self._request_stop()
                return
            log.warning("worker %d (pid %d) exited with %d; replacing it", index, process.pid, code)
            young = time.monotonic() - started < _YOUNG
            pause = min(pause * 2, _MAX_PAUSE) if young else 0.5
            if young:
                with contextlib.suppress(TimeoutError):  # a stop ends the pause
                    await asyncio.wait_for(self._stop.wait(), pause)

    async def _spawn(self, directory: str) -> tuple[asyncio.subprocess.Process, int]:
        """Start a worker; return it and the read end of its readiness pipe."""
        argv = [sys.executable, "-m", "gateway", "serve"]
        if self.config is not None:
            argv += ["--config", self.config]
        ready, ready_w = os.pipe()
        env = {
            **os.environ,
            WORKER_ENV: str(os.getpid()),
            MULTIPROC_ENV: directory,
            # The supervisor's Redis: the embedded one it started, or the configured URL.
            "KEYGATE_REDIS_URL": self.redis_url,
            sockets.LISTENER_FDS_ENV: sockets.encode(self.listening),
            READY_ENV: str(ready_w),
        }
        try:
            # A supervisor killed outright takes its workers with it (no orphans).
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                pass_fds=[*sockets.fds(self.listening), ready_w],
                preexec_fn=die_with_parent,
            )
        except BaseException:
            os.close(ready)
            raise
        finally:
            os.close(ready_w)  # the worker's copy alone: its exit closes the pipe
        return process, ready

    async def _stop_all(self, keepers: list[asyncio.Task[None]]) -> None:
        """SIGTERM every worker; SIGKILL those still running after the deadline. Returns
        once every keeper has returned, so no worker outlives the supervisor."""
        for process in list(self.workers.values()):
            _signal(process, signal.SIGTERM)
        deadline = self.settings.shutdown_timeout + _MARGIN
        _, late = await asyncio.wait(keepers, timeout=deadline)
        if late:
            log.error("%d workers still running after %gs: killed", len(self.workers), deadline)
            for process in list(self.workers.values()):
                _signal(process, signal.SIGKILL)
            await asyncio.wait(late)
        for keeper in keepers:
            if not keeper.cancelled() and keeper.exception() is not None:
                log.error("supervising a worker failed: %r", keeper.exception())


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)


async def _readiness(fd: int) -> bool:
    """Whether the worker on the pipe's other end says it serves (one byte) before it
    closes the pipe (exits). Closes ``fd``."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bool] = loop.create_future()

    def readable() -> None:
        if not answer.done():
            try:
                answer.set_result(os.read(fd, 1) != b"")
            except OSError:
                answer.set_result(False)

    loop.add_reader(fd, readable)
    try:
        return await answer
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _mark_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges (its counters stay: they were really counted)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def config_path(given: str | None) -> str | None:
    """The config file a worker is to read (absolute: workers may start elsewhere)."""
    return None if given is None else str(Path(given).resolve())
