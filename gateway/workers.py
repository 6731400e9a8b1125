"""``keygate serve --workers N``: N worker processes sharing the listeners.

Each worker is a whole ``keygate serve`` (its own event loop, Redis connections and
upstream pools) that binds the proxy, admin and metrics ports with ``SO_REUSEPORT``, so
the kernel spreads connections over them. This process only supervises:

- it starts the embedded Redis, if configured, once, and hands its URL to the workers;
- it gives the workers one prometheus-client multiprocess directory, so any worker's
  ``/metrics`` sums all of them, and marks a dead worker's files as dead;
- a worker that exits while nobody asked it to is replaced (with a growing pause while
  replacements die young, so a broken config does not spin);
- on SIGTERM or SIGINT it passes SIGTERM on, waits up to ``shutdown_timeout`` (plus a
  margin) for the workers to finish their requests and settlements, kills any that did
  not, and exits 0 only if every worker exited 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from gateway.config.model import Settings
from gateway.embedded import die_with_parent

log = logging.getLogger("keygate")

WORKER_ENV = "KEYGATE_WORKER_OF"  # set in a worker: the supervisor's pid (not an option)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_YOUNG = 5.0  # seconds: a worker dying sooner than this after its start died young
_MAX_PAUSE = 10.0
_MARGIN = 5.0  # seconds beyond shutdown_timeout before a worker is killed


def is_worker() -> bool:
    return WORKER_ENV in os.environ


class Supervisor:
    def __init__(self, settings: Settings, config: str | None, redis_url: str) -> None:
        self.settings = settings
        self.config = config
        self.redis_url = redis_url
        self.stopping = False
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.codes: list[int] = []
        self._own_dir: str | None = None

    async def run(self) -> int:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            directory = self._own_dir = tempfile.mkdtemp(prefix="keygate-metrics-")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            keepers = [
                asyncio.create_task(self._keep(index, directory))
                for index in range(self.settings.workers)
            ]
            log.info("supervising %d workers", self.settings.workers)
            await stop.wait()
            self.stopping = True
            await self._stop_all()
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)
        return 0 if all(code == 0 for code in self.codes) else 1

    async def _keep(self, index: int, directory: str) -> None:
        """Keep worker ``index`` running until the supervisor stops."""
        pause = 0.5
        while not self.stopping:
            started = time.monotonic()
            process = await self._spawn(directory)
            self.workers[process.pid] = process
            code = await process.wait()
            del self.workers[process.pid]
            _mark_dead(process.pid, directory)
            if self.stopping:
                self.codes.append(code)
                return
            log.warning("worker %d (pid %d) exited with %d; replacing it", index, process.pid, code)
            young = time.monotonic() - started < _YOUNG
            pause = min(pause * 2, _MAX_PAUSE) if young else 0.5
            await asyncio.sleep(pause if young else 0)

    async def _spawn(self, directory: str) -> asyncio.subprocess.Process:
        argv = [sys.executable, "-m", "gateway", "serve"]
        if self.config is not None:
            argv += ["--config", self.config]
        env = {
            **os.environ,
            WORKER_ENV: str(os.getpid()),
            MULTIPROC_ENV: directory,
            # The supervisor's Redis: the embedded one it started, or the configured URL.
            "KEYGATE_REDIS_URL": self.redis_url,
        }
        # A supervisor killed outright takes its workers with it (no orphans on the ports).
        return await asyncio.create_subprocess_exec(*argv, env=env, preexec_fn=die_with_parent)

    async def _stop_all(self) -> None:
        """SIGTERM every worker; SIGKILL those still running after the deadline."""
        for process in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = self.settings.shutdown_timeout + _MARGIN
        waiting = [process.wait() for process in self.workers.values()]
        if not waiting:
            return
        _, late = await asyncio.wait([asyncio.ensure_future(w) for w in waiting], timeout=deadline)
        if late:
            log.error("%d workers still running after %gs: killed", len(late), deadline)
            for process in list(self.workers.values()):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await asyncio.wait(late)


def _mark_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges (its counters stay: they were really counted)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def config_path(given: str | None) -> str | None:
    """The config file a worker is to read (absolute: workers may start elsewhere)."""
    return None if given is None else str(Path(given).resolve())
