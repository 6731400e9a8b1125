"""Reloading the config of a running ``keygate serve`` (a real process): SIGHUP or
``POST /v1/admin/reload`` switches routes, upstreams, key sources and route limits for new
requests while requests in flight finish on the old config; an invalid config changes
nothing and is logged; options only a restart applies are named; under ``--workers`` every
worker switches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MakeKey, bearer
from tests.procs import KEYGATE, clean_env, free_port, http_get, write_config
from tests.proxy.conftest import LOOPBACK, ServeApp

RELOADED = "reloaded: "


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    config_path: Path
    config: dict[str, Any]
    port: int
    admin: int
    errors: Path

    @property
    def stderr(self) -> str:
        return self.errors.read_text(errors="replace")

    def rewrite(self, **changes: Any) -> None:
        self.config = {**self.config, **changes}
        write_config(self.config_path, self.config)

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    async def wait_log(self, text: str, count: int = 1) -> None:
        """Until ``text`` has appeared ``count`` times on the gateway's stderr."""
        deadline = time.monotonic() + 20
        while self.stderr.count(text) < count:
            assert self.process.poll() is None, f"keygate exited: {self.stderr}"
            assert time.monotonic() < deadline, f"no {text!r} x{count} in: {self.stderr}"
            await asyncio.sleep(0.05)


Start = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway(
    tmp_path: Path, redis_url: str, key_prefix: str, redis: object
) -> AsyncIterator[Start]:
    """``await gateway(upstreams, routes, workers=1, **config)``: ``keygate serve`` on the
    test's Redis and key prefix, once its listeners answer. (``redis``: its teardown
    deletes the test's keys after the processes stop.)"""
    started: list[subprocess.Popen[bytes]] = []

    async def start(
        upstreams: dict[str, str], routes: list[dict[str, Any]], workers: int = 1, **extra: Any
    ) -> Gateway:
        port, admin = free_port(), free_port()
        config = {
            "listen": f"{LOOPBACK}:{port}",
            "admin_listen": f"{LOOPBACK}:{admin}",
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "log": {"format": "text", "level": "info", "access": False},
            "upstreams": {name: {"url": url} for name, url in upstreams.items()},
            "routes": routes,
            **extra,
        }
        path = write_config(tmp_path / "gw.yaml", config)
        errors = tmp_path / "serve.err"
        argv = [*KEYGATE, "serve", "--config", str(path), "--workers", str(workers)]
        process = _spawn(argv, errors)
        started.append(process)
        running = Gateway(process, path, config, port, admin, errors)
        await running.wait_log("proxy listener on", count=workers)
        await asyncio.to_thread(_wait_ready, admin)
        return running

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
        if process.poll() is None:
            process.kill()
        process.wait()


def _spawn(argv: list[str], errors: Path) -> subprocess.Popen[bytes]:
    with errors.open("wb") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=clean_env()
        )


def _wait_ready(admin: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError):
            if http_get(admin, "/openapi.json")[0] == 200:
                return
        assert time.monotonic() < deadline, "admin listener never answered"
        time.sleep(0.05)


def _named(name: str, delay: float = 0.0) -> Callable[[web.BaseRequest], Awaitable[web.Response]]:
    """An upstream that answers its own name (after ``delay`` seconds)."""

    async def handler(request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(text=name)

    return handler


@contextlib.asynccontextmanager
async def _client() -> AsyncIterator[Callable[..., Awaitable[tuple[int, str]]]]:
    """``await get(url, secret=None, headers=None)``: a new connection per request, so
    that requests spread over every worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def get(
            url: str, secret: str | None = None, headers: dict[str, str] | None = None
        ) -> tuple[int, str]:
            sent = {**bearer(secret), **(headers or {})} if secret else dict(headers or {})
            async with http.get(url, headers=sent) as response:
                return response.status, await response.text()

        yield get


def _post(port: int, path: str, secret: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", method="POST", data=b"")
    request.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_sighup_switches_new_requests_while_requests_in_flight_finish_on_the_old(
    serve_app: ServeApp, gateway: Start, make_key: MakeKey
) -> None:
    old = f"http://{LOOPBACK}:{await serve_app(_named('old', delay=1.5))}"
    new = f"http://{LOOPBACK}:{await serve_app(_named('new'))}"
    running = await gateway(
        {"old": old}, [{"name": "api", "prefix": "/api", "upstream": "old"}], shutdown_timeout=10
    )
    issued = await make_key()
    async with _client() as get:
        in_flight = [asyncio.create_task(get(running.url("/api"), issued.secret)) for _ in range(3)]
        await asyncio.sleep(0.5)  # every one has reached the old upstream
        running.rewrite(
            upstreams={"old": {"url": old}, "new": {"url": new}},
            routes=[
                {"name": "api", "prefix": "/api", "upstream": "new"},
                {"name": "extra", "prefix": "/extra", "upstream": "new"},
            ],
        )
        running.process.send_signal(signal.SIGHUP)
        await running.wait_log(RELOADED)
        assert await get(running.url("/api"), issued.secret) == (200, "new")
        assert await get(running.url("/extra"), issued.secret) == (200, "new")
        assert await asyncio.gather(*in_flight) == [(200, "old")] * 3
    assert running.process.poll() is None, running.stderr  # a SIGHUP does not stop it
    assert "reloaded: 2 routes, 2 upstreams (config generation 2)" in running.stderr
    running.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(running.process.wait, 30) == 0


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ("routes: [{name: api, prefix: /api, upstream: nowhere}]\n", "routes[0].upstream"),
        ("routes: [{name: api, prefix: /api\n", "gw.yaml"),
    ],
    ids=["unknown-upstream", "not-yaml"],
)
async def test_an_invalid_config_is_logged_and_the_running_one_stays(
    serve_app: ServeApp, gateway: Start, make_key: MakeKey, broken: str, problem: str
) -> None:
    up = f"http://{LOOPBACK}:{await serve_app(_named('up'))}"
    running = await gateway({"up": up}, [{"name": "api", "prefix": "/api", "upstream": "up"}])
    issued = await make_key()
    running.config_path.write_text(broken)
    running.process.send_signal(signal.SIGHUP)
    await running.wait_log("reload refused, the running config stays: ")
    refusal = [line for line in running.stderr.splitlines() if "reload refused" in line]
    assert any(problem in line for line in refusal), refusal
    async with _client() as get:
        assert await get(running.url("/api"), issued.secret) == (200, "up")
    assert RELOADED not in running.stderr
    assert running.process.poll() is None


async def test_route_limits_and_key_sources_switch_on_reload(
    serve_app: ServeApp, gateway: Start, make_key: MakeKey
) -> None:
    up = f"http://{LOOPBACK}:{await serve_app(_named('up'))}"
    route = {"name": "api", "prefix": "/api", "upstream": "up"}
    running = await gateway({"up": up}, [route])
    issued = await make_key()
    async with _client() as get:
        assert [await get(running.url("/api"), issued.secret) for _ in range(3)] == [
            (200, "up")
        ] * 3
        running.rewrite(
            routes=[{**route, "rate_limit": {"requests": 1, "period_seconds": 60}}],
            keys={"sources": ["x-api-key"]},
        )
        running.process.send_signal(signal.SIGHUP)
        await running.wait_log(RELOADED)
        by_header = {"x-api-key": issued.secret}
        assert (await get(running.url("/api"), headers=by_header))[0] == 200
        assert (await get(running.url("/api"), headers=by_header))[0] == 429
        assert (await get(running.url("/api"), issued.secret))[0] == 401  # Bearer: not a source


async def test_the_admin_api_reloads_and_names_what_needs_a_restart(
    serve_app: ServeApp, gateway: Start, make_key: MakeKey
) -> None:
    up = f"http://{LOOPBACK}:{await serve_app(_named('up'))}"
    running = await gateway({"up": up}, [])
    admin_key = await make_key(scopes=["org:admin"])
    viewer = await make_key(scopes=["apikeys:view"])
    other_port = free_port()
    running.rewrite(
        routes=[{"name": "api", "prefix": "/api", "upstream": "up"}],
        admin_listen=f"{LOOPBACK}:{other_port}",
    )

    status, body = await asyncio.to_thread(_post, running.admin, "/v1/admin/reload", viewer.secret)
    assert (status, body["code"]) == (403, "forbidden_scope")
    async with _client() as get:
        assert (await get(running.url("/api"), admin_key.secret))[0] == 404  # not yet

    status, body = await asyncio.to_thread(
        _post, running.admin, "/v1/admin/reload", admin_key.secret
    )
    assert (status, body) == (
        200,
        {
            "status": "reloaded",
            "generation": 2,
            "routes": 1,
            "upstreams": 1,
            "restart_needed": ["admin_listen"],
        },
    )
    async with _client() as get:
        assert await get(running.url("/api"), admin_key.secret) == (200, "up")
    assert "reload: admin_listen changed; it takes effect at the next restart" in running.stderr

    running.rewrite(routes=[{"name": "api", "prefix": "/api", "upstream": "nowhere"}])
    status, body = await asyncio.to_thread(
        _post, running.admin, "/v1/admin/reload", admin_key.secret
    )
    assert status == 409, body
    assert body["detail"] == "the config is invalid; the running config stays"
    assert [e["field"] for e in body["errors"]] == ["routes[0].upstream"]
    async with _client() as get:
        assert await get(running.url("/api"), admin_key.secret) == (200, "up")


@pytest.mark.parametrize("how", ["sighup", "admin-api"])
async def test_every_worker_reloads(
    serve_app: ServeApp, gateway: Start, make_key: MakeKey, how: str
) -> None:
    old = f"http://{LOOPBACK}:{await serve_app(_named('old'))}"
    new = f"http://{LOOPBACK}:{await serve_app(_named('new'))}"
    running = await gateway(
        {"old": old}, [{"name": "api", "prefix": "/api", "upstream": "old"}], workers=2
    )
    issued = await make_key(scopes=["*"])
    running.rewrite(
        upstreams={"new": {"url": new}},
        routes=[{"name": "api", "prefix": "/api", "upstream": "new"}],
    )
    if how == "sighup":
        running.process.send_signal(signal.SIGHUP)
    else:
        status, body = await asyncio.to_thread(
            _post, running.admin, "/v1/admin/reload", issued.secret
        )
        assert (status, body["status"]) == (200, "signalled"), body
    await running.wait_log(RELOADED, count=2)  # one line per worker
    async with _client() as get:
        answers = [await get(running.url("/api"), issued.secret) for _ in range(40)]
    assert answers == [(200, "new")] * 40
    assert running.process.poll() is None


async def test_under_workers_an_invalid_config_is_refused_once_and_nothing_changes(
    serve_app: ServeApp, gateway: Start, make_key: MakeKey
) -> None:
    up = f"http://{LOOPBACK}:{await serve_app(_named('up'))}"
    running = await gateway(
        {"up": up}, [{"name": "api", "prefix": "/api", "upstream": "up"}], workers=2
    )
    issued = await make_key()
    running.config_path.write_text("routes: [{name: api, prefix: /api, upstream: nowhere}]\n")
    running.process.send_signal(signal.SIGHUP)
    await running.wait_log("reload refused, the running config stays: routes[0].upstream")
    async with _client() as get:
        answers = [await get(running.url("/api"), issued.secret) for _ in range(20)]
    assert answers == [(200, "up")] * 20
    # The supervisor checked the file once; no worker was told to reload it.
    assert running.stderr.count("reload refused") == 1, running.stderr
    assert RELOADED not in running.stderr and running.process.poll() is None
