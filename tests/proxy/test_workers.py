"""``keygate serve --workers N``: the workers share one port (the sockets the supervisor
bound), their metrics add up, a worker that dies is replaced, and SIGTERM lets requests in
flight finish before every process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MakeKey, bearer
from tests.procs import KEYGATE, clean_env, free_port, http_get, write_config
from tests.proxy.conftest import LOOPBACK, ServeApp


def _children(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rpartition(":")[2], 16) == port:
            inodes.add(inode)
    return inodes


def _listens(pid: int, port: int) -> bool:
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(str(fd.readlink()) in wanted for fd in fds.iterdir())
    except OSError:
        return False


@dataclass
class Workers:
    process: subprocess.Popen[bytes]  # the supervisor
    port: int
    admin: int
    pids: set[int]  # the workers when they were all up
    errors: Path  # the supervisor's (and its workers') stderr


@pytest.fixture
def supervisor(
    tmp_path: Path, redis_url: str, key_prefix: str, redis: object
) -> Iterator[Callable[..., Awaitable[Workers]]]:
    """``await supervisor(upstream_url, **config)``: ``keygate serve --workers 2`` with one
    route ``/up`` to ``upstream_url``, on the test's Redis and key prefix, once both workers
    listen. (``redis``: its teardown deletes the test's keys after the processes stop.)"""
    started: list[subprocess.Popen[bytes]] = []

    async def start(upstream_url: str, **extra: Any) -> Workers:
        port, admin = free_port(), free_port()
        config = {
            "listen": f"{LOOPBACK}:{port}",
            "admin_listen": f"{LOOPBACK}:{admin}",
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "log": {"format": "text", "level": "info", "access": False},
            "upstreams": {"up": {"url": upstream_url}},
            "routes": [{"name": "up", "prefix": "/up", "upstream": "up"}],
            **extra,
        }
        path = write_config(tmp_path / "gw.yaml", config)
        errors = tmp_path / "serve.err"
        process = _spawn(path, errors)
        started.append(process)
        await asyncio.to_thread(_wait, lambda: _ready(admin) and len(_children(process.pid)) == 2)
        pids = _children(process.pid)
        # A worker holds the inherited sockets from its start: wait until each serves.
        await asyncio.to_thread(_wait, lambda: pids <= _serving(errors))
        return Workers(process, port, admin, pids, errors)

    yield start
    for process in started:
        workers = _children(process.pid)  # before the supervisor goes: then they are init's
        if process.poll() is None:
            process.kill()
            process.wait()
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def _spawn(config: Path, errors: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*KEYGATE, "serve", "--config", str(config), "--workers", "2"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=errors.open("wb"),
        env=clean_env(),
    )


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _serving(errors: Path) -> set[int]:
    """The workers the supervisor has logged as serving (each tells it once it does)."""
    said = errors.read_text(errors="replace")
    return {int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) serving", said)}


def _ready(admin: int) -> bool:
    try:
        return http_get(admin, "/openapi.json")[0] == 200
    except OSError:
        return False


async def test_workers_share_the_port_add_up_and_are_replaced(
    serve_app: ServeApp, supervisor: Callable[..., Awaitable[Workers]], make_key: MakeKey
) -> None:
    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hi")

    started = await supervisor(f"http://{LOOPBACK}:{await serve_app(hello)}")
    process, port, admin, workers = (
        started.process,
        started.port,
        started.admin,
        started.pids,
    )
    assert all(_listens(w, admin) for w in workers)

    issued = await make_key()
    # A new connection per request, so the kernel spreads them over both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def hit() -> int:
            async with http.get(f"http://{LOOPBACK}:{port}/up", headers=bearer(issued.secret)) as r:
                await r.read()
                return r.status

        assert [await hit() for _ in range(40)] == [200] * 40

        async def served() -> float:
            async with http.get(f"http://{LOOPBACK}:{admin}/metrics") as r:
                text = await r.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "keygate_requests_total" and sample.labels["route"] == "up":
                        return sample.value
            return 0.0

        assert await served() == 40  # whichever worker answers the scrape, it counts both

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = _children(process.pid)  # one reading: the victim lingers until reaped
            return len(now) == 2 and victim not in now

        await asyncio.to_thread(_wait, replaced)
        replacement = (_children(process.pid) - workers).pop()
        await asyncio.to_thread(_wait, lambda: replacement in _serving(started.errors))
        assert _listens(replacement, port)
        assert [await hit() for _ in range(10)] == [200] * 10
        assert await served() == 50  # the dead worker's 20-odd requests are still counted

    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert _children(process.pid) == set()


async def test_sigterm_lets_requests_in_flight_finish(
    serve_app: ServeApp, supervisor: Callable[..., Awaitable[Workers]], make_key: MakeKey
) -> None:
    async def slow(request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="finished")

    started = await supervisor(f"http://{LOOPBACK}:{await serve_app(slow)}", shutdown_timeout=10)
    process, port = started.process, started.port
    issued = await make_key()
    async with aiohttp.ClientSession() as http:

        async def one() -> tuple[int, str]:
            async with http.get(f"http://{LOOPBACK}:{port}/up", headers=bearer(issued.secret)) as r:
                return r.status, await r.text()

        in_flight = [asyncio.create_task(one()) for _ in range(6)]
        await asyncio.sleep(0.3)  # every request has reached a worker and the upstream
        since = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.gather(*in_flight) == [(200, "finished")] * 6
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert time.monotonic() - since < 10  # not the deadline: they finished, then exited


async def test_a_supervisor_killed_outright_takes_its_workers_with_it(
    serve_app: ServeApp, supervisor: Callable[..., Awaitable[Workers]]
) -> None:
    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hi")

    started = await supervisor(f"http://{LOOPBACK}:{await serve_app(hello)}")
    started.process.kill()
    started.process.wait()

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in started.pids)

    await asyncio.to_thread(_wait, gone)
