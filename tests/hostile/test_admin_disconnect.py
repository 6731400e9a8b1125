"""A client that announces a body and closes its connection part way through it has
left: that is no key-store failure. Nothing is logged above debug, no store error is
counted, and nothing is written. Raw sockets, because an HTTP client sends what it
announces."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.admin.app import build_admin_app
from gateway.config.model import Settings
from gateway.metrics import Metrics
from gateway.store.keystore import KeyStore
from tests.conftest import MakeKey
from tests.proxy.conftest import LOOPBACK, StartGateway

STORE_ERROR_WORDS = ("store", "unavailable", "ConnectionResetError", "Traceback")


async def _send_part_and_close(port: int, path: str, secret: str | None) -> None:
    """A POST announcing 1000 bytes of body, 10 of them sent, then the connection closed."""
    _, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nAuthorization: Bearer {secret}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            '{"name": "'
        ).encode()
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _until(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check`` until true; fail (TimeoutError) after ``within`` seconds. (Polled:
    the log and the metrics have no event to wait on.)"""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """keygate's records at any level, and any other logger's warnings and errors (an
    exception escaping a handler is aiohttp's ERROR line)."""
    return [
        r for r in caplog.records if r.name.startswith("keygate") or r.levelno >= logging.WARNING
    ]


def _store_errors(metrics_text: str) -> list[str]:
    """Samples counting a store error, with a non-zero value."""
    return [
        line
        for line in metrics_text.splitlines()
        if not line.startswith("#")
        and ("store_error" in line or line.startswith("keygate_redis_errors_total"))
        and float(line.rsplit(" ", 1)[1]) > 0
    ]


async def test_an_admin_upload_cut_short_is_the_client_leaving_not_a_store_error(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    store: KeyStore,
    make_key: MakeKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    client = await aiohttp_client(build_admin_app(settings, store, metrics))
    admin = await make_key(scopes=["apikeys:*"], workspace_id="ws-left")
    caplog.set_level(logging.DEBUG, logger="keygate")
    port = client.server.port
    assert port is not None
    await _send_part_and_close(port, "/v1/keys", admin.secret)
    # The handler runs on after the client is gone: wait for its one log line.
    await _until(lambda: any(r.name.startswith("keygate.admin") for r in caplog.records))
    admin_lines = _logged(caplog)
    assert all(r.levelno <= logging.DEBUG for r in admin_lines), [r.message for r in admin_lines]
    assert not any(word in r.getMessage() for r in admin_lines for word in STORE_ERROR_WORDS)
    response = await client.get("/metrics")
    assert _store_errors(await response.text()) == []
    assert await store.count("ws-left") == 1  # nothing created


async def test_a_dialect_upload_cut_short_is_no_store_error_either(
    start_gateway: StartGateway,
    store: KeyStore,
    make_key: MakeKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await start_gateway(
        dialects={"langflow": {"enabled": True}, "openrouter": {"enabled": True}}
    )
    caller = await make_key(scopes=["apikeys:view", "apikeys:create"], workspace_id="ws-left")
    caplog.set_level(logging.DEBUG, logger="keygate")
    for path in ("/api/v1/keys", "/api/v1/api_key/"):
        await _send_part_and_close(gateway.port, path, caller.secret)
    text = ""

    def both_counted() -> bool:
        nonlocal text
        text = gateway.proxy.metrics.exposition().decode()
        return 'route="dialect:openrouter"' in text and 'route="dialect:langflow"' in text

    await _until(both_counted)
    assert _store_errors(text) == []
    lines = _logged(caplog)
    assert all(r.levelno <= logging.DEBUG for r in lines), [r.getMessage() for r in lines]
    assert await store.count("ws-left") == 1


async def test_a_proxied_body_cut_short_while_read_for_its_resource_is_no_store_error(
    start_gateway: StartGateway,
    make_key: MakeKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A key limited to listed resources makes the proxy read the body ("infer" names its
    # resource in JSON) before it decides. The proxy's handler is usually cancelled when the
    # client leaves (a 499); whichever comes first, it is never a store error, and with
    # fail_open never a request let through unchecked.
    gateway = await start_gateway(redis={"on_error": "fail_open"})
    caller = await make_key(resources=["demo-small"])
    caplog.set_level(logging.DEBUG, logger="keygate")
    await _send_part_and_close(gateway.port, "/infer", caller.secret)
    text = ""

    def counted() -> bool:
        nonlocal text
        text = gateway.proxy.metrics.exposition().decode()
        return 'route="infer"' in text

    await _until(counted)
    assert _store_errors(text) == []
    assert "keygate_fail_open_total 0.0" in text  # never let through as if Redis were down
    lines = _logged(caplog)
    assert all(r.levelno <= logging.DEBUG for r in lines), [r.getMessage() for r in lines]
