"""The listening sockets of ``keygate serve`` (a real process, with and without
``--workers``): bound once (by the supervisor, handed to its workers), never shared with
another process, so a taken port is one line and exit 1; a worker that fails at boot stops
the supervisor; a SIGTERM at any moment of the start leaves no worker behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.cli.running import run
from tests.conftest import MakeKey, bearer
from tests.procs import (
    KEYGATE,
    alive,
    children,
    clean_env,
    free_port,
    http_get,
    reap,
    subreaper,
    write_config,
)

LOOPBACK = "127.0.0.1"
SAFETY = 60.0  # seconds: a bound on waits that end much sooner when keygate is right
WORKER_ENV = b"KEYGATE_WORKER_OF="
LISTENING = re.compile(r"proxy listener on 127\.0\.0\.1:(\d+)")
SERVING = re.compile(r"worker \d \(pid \d+\) serving")


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hi")

    runner = web.ServerRunner(web.Server(hello), shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    yield f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    await runner.cleanup()


class Gateways:
    """``keygate serve`` processes of one test, each stopped (with its workers) at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[subprocess.Popen[bytes]] = []

    def config(self, name: str, **config: Any) -> Path:
        return write_config(self.root / f"{name}.yaml", config)

    def start(self, config: Path, workers: int) -> subprocess.Popen[bytes]:
        errors = self.root / f"{config.stem}.{len(self.started)}.err"
        process = subprocess.Popen(
            [*KEYGATE, "serve", "--config", str(config), "--workers", str(workers)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors.open("wb"),
            env=clean_env(),
        )
        process.errors = errors  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    async def serving(self, config: Path, workers: int, admin: int) -> subprocess.Popen[bytes]:
        """Start one and wait until every worker serves (each logs its proxy listener)."""
        process = self.start(config, workers)

        def up() -> bool:
            assert process.poll() is None, f"keygate exited: {stderr(process)}"
            if len(LISTENING.findall(stderr(process))) < workers:
                return False
            with contextlib.suppress(OSError):
                return http_get(admin, "/openapi.json")[0] == 200
            return False

        await asyncio.to_thread(_wait, up)
        return process

    def close(self) -> None:
        for process in self.started:
            workers = workers_of(process.pid)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for pid in workers | workers_of(process.pid):  # those a wrong supervisor left
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def gateways(tmp_path: Path, redis: object) -> Iterator[Gateways]:
    """(``redis``: its teardown deletes the test's keys after the processes stop.)"""
    started = Gateways(tmp_path)
    try:
        yield started
    finally:
        started.close()


def stderr(process: subprocess.Popen[bytes]) -> str:
    path: Path = process.errors  # type: ignore[attr-defined]
    return path.read_text(errors="replace")


def workers_of(supervisor: int) -> set[int]:
    """Running processes whose environment marks them as ``supervisor``'s workers."""
    mark = WORKER_ENV + str(supervisor).encode() + b"\0"
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if mark in (entry / "environ").read_bytes() and alive(int(entry.name)):
                    found.add(int(entry.name))
    return found


def _wait(predicate: Callable[[], bool], timeout: float = SAFETY, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def _gateway_config(
    port: int, admin: int, redis_url: str, prefix: str, upstream: str, **extra: Any
) -> dict[str, Any]:
    return {
        "listen": f"{LOOPBACK}:{port}",
        "admin_listen": f"{LOOPBACK}:{admin}",
        "redis": {"url": redis_url, "key_prefix": prefix},
        "log": {"format": "text", "level": "info", "access": False},
        "upstreams": {"up": {"url": upstream}},
        "routes": [{"name": "up", "prefix": "/up", "upstream": "up"}],
        **extra,
    }


async def _statuses(port: int, secret: str | None, count: int = 20) -> list[int]:
    """``count`` requests to ``/up``, each on a new connection (a shared port would
    spread them over both gateways)."""
    statuses = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(count):
            url = f"http://{LOOPBACK}:{port}/up"
            async with http.get(url, headers=bearer(secret)) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


@pytest.mark.parametrize(
    ("first", "second"), [(2, 2), (1, 1), (1, 2), (2, 1)], ids=lambda n: f"workers{n}"
)
async def test_a_second_gateway_on_the_same_ports_is_refused(
    gateways: Gateways,
    redis_url: str,
    key_prefix: str,
    make_key: MakeKey,
    upstream_url: str,
    first: int,
    second: int,
) -> None:
    port, admin = free_port(), free_port()
    config = _gateway_config(port, admin, redis_url, key_prefix, upstream_url)
    await gateways.serving(gateways.config("first", **config), first, admin)
    issued = await make_key()

    other_store = {**config, "redis": {"url": redis_url, "key_prefix": f"{key_prefix}other:"}}
    other_store["log"] = {"level": "warning"}
    intruder = gateways.start(gateways.config("second", **other_store), second)
    try:
        code: int | None = await asyncio.to_thread(intruder.wait, 20)
    except subprocess.TimeoutExpired:  # it serves: the port is shared
        code = None
    statuses = await _statuses(port, issued.secret)
    said = stderr(intruder).strip().splitlines()
    expected = [f"keygate: {LOOPBACK}:{port} (listen) is already in use"]
    assert (code, said, statuses) == (1, expected, [200] * 20)


@pytest.mark.parametrize("option", ["listen", "admin_listen", "metrics.listen"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_taken_by_anything_is_one_line(
    tmp_path: Path, redis_url: str, option: str, workers: int
) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        addresses = {
            "listen": f"{LOOPBACK}:{free_port()}",
            "admin_listen": f"{LOOPBACK}:{free_port()}",
            "metrics.listen": f"{LOOPBACK}:{free_port()}",
            option: f"{LOOPBACK}:{port}",
        }
        config = {
            "listen": addresses["listen"],
            "admin_listen": addresses["admin_listen"],
            "metrics": {"listen": addresses["metrics.listen"]},
            "redis": {"url": redis_url},
            "log": {"level": "warning"},
        }
        path = write_config(tmp_path / "gw.yaml", config)
        result = run(
            "serve", "--config", str(path), "--workers", str(workers), cwd=tmp_path, timeout=20
        )
    assert (result.code, result.err.strip().splitlines()) == (
        1,
        [f"keygate: {LOOPBACK}:{port} ({option}) is already in use"],
    )


async def test_a_worker_that_fails_at_boot_stops_the_supervisor(
    gateways: Gateways, redis_url: str, key_prefix: str, upstream_url: str
) -> None:
    port, admin = free_port(), free_port()
    config = _gateway_config(port, admin, redis_url, key_prefix, upstream_url)
    path = gateways.config("gw", **config)
    process = await gateways.serving(path, 2, admin)
    await asyncio.to_thread(_wait, lambda: len(SERVING.findall(stderr(process))) == 2)
    # The file turns invalid, then a worker dies: its replacement cannot start, and
    # neither could any after it.
    write_config(path, {**config, "shutdown_timeout": "soon"})
    first = workers_of(process.pid)
    os.kill(min(first), signal.SIGKILL)
    code = await asyncio.to_thread(process.wait, SAFETY)
    said = stderr(process)
    assert code == 1, said
    assert re.search(r"worker \d \(pid \d+\) failed at boot with code 2\n", said), said
    assert said.count("shutdown_timeout: must be") == 1, said  # one replacement, no loop
    assert workers_of(process.pid) == set()  # the healthy worker was stopped too


def test_workers_that_cannot_start_stop_the_supervisor(tmp_path: Path, redis_url: str) -> None:
    # A metrics directory that does not exist: the supervisor only hands it on, every
    # worker fails on it before it serves.
    config = {
        "listen": f"{LOOPBACK}:0",
        "admin_listen": f"{LOOPBACK}:0",
        "redis": {"url": redis_url},
        "log": {"format": "text", "level": "warning"},
    }
    path = write_config(tmp_path / "gw.yaml", config)
    missing = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}
    result = run(
        "serve", "--config", str(path), "--workers", "2", cwd=tmp_path, env=missing, timeout=SAFETY
    )
    assert result.code == 1, result.err
    assert re.search(r"worker \d \(pid \d+\) failed at boot with code 1\n", result.err)
    assert "replacing it" not in result.err


def _catches_sigterm(pid: int) -> bool:
    """Whether ``pid`` has its SIGTERM handler in place (SigCgt in /proc/PID/status)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


# SIGTERM lands while the workers are being forked (the first few ms after the handler
# is in place), while they boot, and once they serve.
@pytest.mark.parametrize("delay", [0.0, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.1, 0.3, 0.8])
def test_a_sigterm_during_the_start_leaves_no_worker_behind(
    tmp_path: Path, redis_url: str, key_prefix: str, delay: float
) -> None:
    config = {
        "listen": f"{LOOPBACK}:0",
        "admin_listen": f"{LOOPBACK}:0",
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "log": {"level": "warning"},
        "shutdown_timeout": 5,  # a worker SIGTERM missed is killed 10 s after the stop
    }
    path = write_config(tmp_path / "gw.yaml", config)
    # As a subreaper this process inherits whatever the supervisor leaves when it exits
    # (running, or exited and unreaped): the workers it did not wait for.
    with subreaper():
        before = set(children(os.getpid()))
        errors = (tmp_path / "serve.err").open("wb")
        process = subprocess.Popen(
            [*KEYGATE, "serve", "--config", str(path), "--workers", "6"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env=clean_env(),
        )
        try:
            _wait(lambda: _catches_sigterm(process.pid) or process.poll() is not None, poll=0)
            time.sleep(delay)
            process.send_signal(signal.SIGTERM)
            code = process.wait(SAFETY)
            left = set(children(os.getpid())) - before - {process.pid}
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            errors.close()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reap(pid)
    said = (tmp_path / "serve.err").read_text(errors="replace")
    assert (code, left) == (0, set()), said


async def test_workers_share_a_port_0_listener(
    gateways: Gateways, redis_url: str, key_prefix: str, make_key: MakeKey, upstream_url: str
) -> None:
    admin = free_port()
    config = _gateway_config(0, admin, redis_url, key_prefix, upstream_url)
    process = await gateways.serving(gateways.config("gw", **config), 2, admin)
    ports = LISTENING.findall(stderr(process))
    assert len(ports) == 2 and len(set(ports)) == 1, stderr(process)  # one port, both workers
    port = int(ports[0])
    issued = await make_key()
    assert await _statuses(port, issued.secret) == [200] * 20
    assert len(workers_of(process.pid)) == 2


AUTH_LISTENING = re.compile(r"auth listener on 127\.0\.0\.1:(\d+)")


async def test_workers_share_the_auth_listener_and_charge_each_check_once(
    gateways: Gateways,
    redis_url: str,
    key_prefix: str,
    make_key: MakeKey,
    upstream_url: str,
    redis: Redis,
) -> None:
    admin, auth = free_port(), free_port()
    config = _gateway_config(
        free_port(), admin, redis_url, key_prefix, upstream_url, auth_listen=f"{LOOPBACK}:{auth}"
    )
    config["routes"][0]["cost"] = {"fixed": 0.25}
    process = await gateways.serving(gateways.config("gw", **config), 2, admin)
    assert AUTH_LISTENING.findall(stderr(process)) == [str(auth)] * 2, stderr(process)
    issued = await make_key()
    checks = {"X-Original-Method": "GET", "X-Original-URI": "/up/x", **bearer(issued.secret)}
    tokens = set()
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection, any worker, each
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(40):
            async with http.get(f"http://{LOOPBACK}:{auth}/auth/nginx", headers=checks) as answer:
                assert answer.status == 200
                tokens.add(answer.headers["X-Keygate-Request-Id"])
    assert len(tokens) == 40  # a ledger entry each, whichever worker wrote it
    spent = f"{key_prefix}u:{{{issued.record.id}}}:t"
    for _ in range(100):  # settlements land within a turn or two of each answer
        if int(await redis.get(spent) or 0) == 40 * 250_000:
            break
        await asyncio.sleep(0.05)
    assert int(await redis.get(spent) or 0) == 40 * 250_000
