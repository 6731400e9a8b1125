"""Prometheus metrics (gateway/metrics.py): after a scripted set of requests, one of each
outcome, every counter holds exactly what happened; per-key series respect their cap; keys
per workspace are counted in the background; /metrics serves the text on the admin
listener; and two processes sharing a multiprocess directory add up."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.store.keystore import KeyStore
from gateway.store.record import RateLimitSpec
from gateway.store.secrets import generate
from tests.conftest import MakeKey, bearer
from tests.procs import KEYGATE, clean_env, free_port, http_get, write_config
from tests.proxy.conftest import LOOPBACK, Gateway, ServeApp, StartGateway, bad_checksum

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels (parsed by the client's own
    parser, so the text is valid exposition format)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_total(found: Samples) -> dict[tuple[str, str, str, str], float]:
    """keygate_requests_total by (route, method, status_class, outcome)."""
    return {
        (d["route"], d["method"], d["status_class"], d["outcome"]): v
        for (name, labels), v in found.items()
        if name == "keygate_requests_total" and (d := dict(labels))
    }


def metrics_of(gateway: Gateway) -> Samples:
    return samples(gateway.proxy.metrics.exposition().decode())


async def _get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with http.get(url, **kwargs) as response:
        await response.read()
        return response.status


async def test_each_outcome_is_counted_exactly(
    cost_gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    gw = cost_gateway.url
    now = int(time.time() * 1000)
    ok = await make_key(scopes=["echo:read"])
    capped = await make_key(limit_micro=250_000)  # one 0.25 request, all time
    limited = await make_key(rate_limit=RateLimitSpec(1, 60))
    expired = await make_key(expires_at=now - 1000)
    disabled = await make_key(disabled=True)
    restricted = await make_key(resources=("allowed-model",))
    script = [
        ("/c/fixed", bearer(capped.secret), 200),
        ("/c/fixed", bearer(capped.secret), 402),
        ("/c/fixed", {}, 401),
        ("/c/fixed", bearer(bad_checksum(ok.secret or "")), 401),
        ("/c/fixed", bearer(expired.secret), 401),
        ("/c/fixed", bearer(disabled.secret), 403),
        ("/echo/a", bearer(ok.secret), 200),
        ("/echo/a", bearer(capped.secret), 403),  # no echo:read
        ("/search?model=other", bearer(restricted.secret), 403),
        ("/c/free", bearer(limited.secret), 200),
        ("/c/free", bearer(limited.secret), 429),
        ("/c/dead_fixed", bearer(ok.secret), 502),
        ("/nowhere", bearer(ok.secret), 404),
    ]
    for path, headers, status in script:
        assert await _get(http, gw + path, headers=headers) == status, path

    found = metrics_of(cost_gateway)
    assert requests_total(found) == {
        ("fixed", "GET", "2xx", "ok"): 1,
        ("fixed", "GET", "4xx", "spend_limited"): 1,
        ("fixed", "GET", "4xx", "missing_key"): 1,
        ("fixed", "GET", "4xx", "invalid_key"): 1,
        ("fixed", "GET", "4xx", "expired"): 1,
        ("fixed", "GET", "4xx", "disabled"): 1,
        ("echo", "GET", "2xx", "ok"): 1,
        ("echo", "GET", "4xx", "forbidden_scope"): 1,
        ("search", "GET", "4xx", "forbidden_resource"): 1,
        ("free", "GET", "2xx", "ok"): 1,
        ("free", "GET", "4xx", "rate_limited"): 1,
        ("dead_fixed", "GET", "5xx", "upstream_error"): 1,
        ("none", "GET", "4xx", "not_found"): 1,
    }
    # Whole-request time for every request; upstream and added time for forwarded ones.
    assert value(found, "keygate_request_duration_seconds_count", route="fixed") == 6
    assert value(found, "keygate_upstream_duration_seconds_count", route="fixed") == 1
    assert value(found, "keygate_added_latency_seconds_count", route="fixed") == 1
    assert value(found, "keygate_upstream_duration_seconds_count", route="dead_fixed") == 1
    assert value(found, "keygate_upstream_duration_seconds_count", route="echo") == 1
    assert value(found, "keygate_upstream_errors_total", upstream="dead", kind="connect") == 1
    # The script ran for every request with a well-formed key (not the bad checksum, not
    # the missing one, not the unrouted one): 13 - 3.
    assert value(found, "keygate_redis_call_duration_seconds_count", call="authorize") == 10
    assert value(found, "keygate_redis_errors_total", call="authorize") == 0
    assert value(found, "keygate_requests_in_flight") == 0
    assert value(found, "keygate_fail_open_total") == 0
    build = [labels for (name, labels) in found if name == "keygate_build_info"]
    assert len(build) == 1 and dict(build[0])["version"]


async def test_store_errors_and_fail_open_are_counted(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    down = {"url": f"redis://{LOOPBACK}:{free_port()}/0", "connect_timeout": 0.2}
    closed = await start_gateway(redis=down)
    opened = await start_gateway(redis={**down, "on_error": "fail_open"})
    # Well-formed (its checksum holds), so only Redis can tell it is unknown.
    headers = bearer(generate(closed.settings.keys.secret_prefix))
    for _ in range(2):
        assert await _get(http, f"{closed.url}/open/x", headers=headers) == 503
    found = metrics_of(closed)
    assert requests_total(found) == {("open", "GET", "5xx", "store_error"): 2}
    assert value(found, "keygate_redis_errors_total", call="authorize") == 2
    assert value(found, "keygate_fail_open_total") == 0

    assert await _get(http, f"{opened.url}/open/x", headers=headers) == 200
    found = metrics_of(opened)
    assert value(found, "keygate_fail_open_total") == 1
    assert value(found, "keygate_redis_errors_total", call="authorize") == 1
    assert requests_total(found) == {("open", "GET", "2xx", "ok"): 1}


async def test_per_key_series_stop_at_the_cap_and_count_the_rest_as_other(
    start_gateway: StartGateway,
    cost_upstream_url: str,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
) -> None:
    from tests.proxy.conftest import COST_ROUTES

    gateway = await start_gateway(
        routes=COST_ROUTES,
        upstreams={"costs": {"url": cost_upstream_url}},
        metrics={"per_key": True, "per_key_max": 2},
    )
    first = await make_key(name="first")
    second = await make_key(name="second")
    third = await make_key(name="third")
    fourth = await make_key(name="fourth")
    for issued, times in ((first, 2), (second, 1), (third, 3), (fourth, 1)):
        for _ in range(times):
            assert await _get(http, f"{gateway.url}/c/fixed", headers=bearer(issued.secret)) == 200
    found = metrics_of(gateway)
    per_key = {
        dict(labels)["key_id"]: (dict(labels)["key_name"], v)
        for (name, labels), v in found.items()
        if name == "keygate_key_requests_total"
    }
    assert per_key == {
        first.record.id: ("first", 2),
        second.record.id: ("second", 1),
        "other": ("other", 4),
    }
    spend = {
        dict(labels)["key_id"]: v
        for (name, labels), v in found.items()
        if name == "keygate_key_spend_credits_total"
    }
    assert spend == {first.record.id: 0.5, second.record.id: 0.25, "other": 1.0}
    text = gateway.proxy.metrics.exposition().decode()
    for issued in (first, second, third, fourth):
        assert issued.secret is not None and issued.secret not in text


async def test_per_key_series_are_off_by_default(
    cost_gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key()
    assert await _get(http, f"{cost_gateway.url}/c/fixed", headers=bearer(issued.secret)) == 200
    names = {name for name, _ in metrics_of(cost_gateway)}
    assert "keygate_key_requests_total" not in names


async def test_keys_per_workspace_are_counted_in_the_background(
    gateway: Gateway, make_key: MakeKey, store: KeyStore
) -> None:
    a = [await make_key(workspace_id="ws-count-a") for _ in range(3)]
    await make_key(workspace_id="ws-count-b")
    await gateway.proxy.refresh_key_counts()
    found = metrics_of(gateway)
    assert value(found, "keygate_keys", workspace="ws-count-a") == 3
    assert value(found, "keygate_keys", workspace="ws-count-b") == 1
    for issued in a:
        await store.revoke(issued.record.id)
    await gateway.proxy.refresh_key_counts()
    found = metrics_of(gateway)
    assert ("keygate_keys", (("workspace", "ws-count-a"),)) not in found  # gone, not 0
    assert value(found, "keygate_keys", workspace="ws-count-b") == 1


async def test_metrics_on_the_proxy_listener_need_a_metrics_read_key(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    reader = await make_key(scopes=["metrics:read"])
    other = await make_key(scopes=["echo:read"])
    gateway = await start_gateway(metrics={"on_proxy": True})
    async with http.get(f"{gateway.url}/metrics", headers=bearer(reader.secret)) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        text = await response.text()
    assert "keygate_build_info" in text
    async with http.get(f"{gateway.url}/metrics", headers={"x-api-key": reader.secret or ""}) as r:
        assert r.status == 200
    for headers, status, code in (
        ({}, 401, "missing_key"),
        (bearer(other.secret), 403, "forbidden_scope"),
    ):
        async with http.get(f"{gateway.url}/metrics", headers=headers) as response:
            assert response.status == status
            assert response.content_type == "application/problem+json"
            assert (await response.json())["code"] == code
    found = metrics_of(gateway)
    assert requests_total(found)[("metrics", "GET", "2xx", "ok")] == 2
    off = await start_gateway()  # the default: only the admin listener serves /metrics
    async with http.get(f"{off.url}/metrics", headers=bearer(reader.secret)) as response:
        assert response.status == 404


# --- real processes: /metrics on the admin listener, two processes adding up -------------


@pytest.fixture
def serve_processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [*KEYGATE, "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"serve-{len(started)}.err").open("wb"),
            env={**clean_env(), **env},
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(admin_port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "keygate serve exited"
        try:
            if http_get(admin_port, "/openapi.json")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("keygate serve did not start")


async def test_two_processes_sharing_a_multiprocess_directory_add_up(
    redis_url: str,
    key_prefix: str,
    redis: object,  # its teardown deletes the test's keys after the processes stop
    serve_app: ServeApp,
    serve_processes: Callable[..., subprocess.Popen[bytes]],
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hi")

    upstream = f"http://{LOOPBACK}:{await serve_app(hello)}"
    shared = tmp_path / "prometheus"
    shared.mkdir()
    replicas = []
    metrics_port = free_port()
    for n in range(2):
        port, admin = free_port(), free_port()
        config: dict[str, Any] = {
            "listen": f"{LOOPBACK}:{port}",
            "admin_listen": f"{LOOPBACK}:{admin}",
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "log": {"level": "warning"},
            "upstreams": {"hello": {"url": upstream}},
            "routes": [{"name": "hello", "prefix": "/hello", "upstream": "hello"}],
        }
        if n == 1:  # the second also on a listener of its own for /metrics
            config["metrics"] = {"listen": f"{LOOPBACK}:{metrics_port}"}
        path = write_config(tmp_path / f"gateway{n}.yaml", config)
        process = serve_processes(path, {"PROMETHEUS_MULTIPROC_DIR": str(shared)})
        replicas.append((port, admin, process))
    for _, admin, process in replicas:
        await asyncio.to_thread(_wait_ready, admin, process)
    issued = await make_key()
    for (port, _, _), count in zip(replicas, (3, 5), strict=True):
        for _ in range(count):
            assert (
                await _get(http, f"http://{LOOPBACK}:{port}/hello", headers=bearer(issued.secret))
                == 200
            )

    async def scrape(admin: int) -> Samples:
        async with http.get(f"http://{LOOPBACK}:{admin}/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            return samples(await response.text())

    for admin in (replicas[0][1], replicas[1][1], metrics_port):  # any answers for both
        found = await scrape(admin)
        assert requests_total(found)[("hello", "GET", "2xx", "ok")] == 8
        assert value(found, "keygate_request_duration_seconds_count", route="hello") == 8

    # A process that dies keeps what it counted: the survivor still reports all 8.
    replicas[0][2].send_signal(signal.SIGKILL)
    replicas[0][2].wait(10)
    found = await scrape(replicas[1][1])
    assert requests_total(found)[("hello", "GET", "2xx", "ok")] == 8
    assert len(os.listdir(shared)) > 0
