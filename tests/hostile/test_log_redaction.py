"""Malformed requests never echo what the client sent: not in the answer, not in any log.

aiohttp quotes the offending bytes of a request it cannot parse, in its 400 body and in the
traceback it logs; a bad byte in an ``Authorization`` line puts the whole API key on stderr.
Here each kind of malformed head (a control byte or a bare LF in the Authorization line, an
overlong target, an overlong header, too many headers, a garbage method) is sent to the proxy
and the admin listener with a distinctive secret in it, every logger is captured at DEBUG,
and the secret must appear in neither the raw answer nor the log. The answer is a fixed
problem: 400, 414 for an overlong target, 431 for overlong or too many header fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from gateway.admin.app import build_admin_app
from gateway.config.load import build
from gateway.listener import operator_runner
from gateway.store.keystore import KeyStore
from tests.proxy.conftest import LOOPBACK, Gateway, StartGateway

SECRET = "kg_LEAKCANARYq8X2vT5nW0pZ7"
OK = f"GET /hello HTTP/1.1\r\nHost: {LOOPBACK}\r\n"

CASES: list[tuple[str, str, int, str]] = [
    ("control-byte", f"{OK}Authorization: Bearer {SECRET}\x01\r\n\r\n", 400, "invalid_request"),
    ("nul-byte", f"{OK}Authorization: Bearer {SECRET}\x00x\r\n\r\n", 400, "invalid_request"),
    ("delete-byte", f"{OK}Authorization: Bearer {SECRET}\x7f\r\n\r\n", 400, "invalid_request"),
    ("bare-lf", f"{OK}Authorization: Bearer {SECRET}\nX-Next: 1\r\n\r\n", 400, "invalid_request"),
    ("bad-method", f"G{SECRET} /hello HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_request"),
    (
        "long-target",
        f"GET /hello?api_key={SECRET}&pad={'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "uri_too_long",
    ),
    (
        "long-header",
        f"{OK}Authorization: Bearer {SECRET}{'a' * 9000}\r\n\r\n",
        431,
        "headers_too_large",
    ),
    ("long-header-name", f"{OK}X-{SECRET}{'a' * 9000}: 1\r\n\r\n", 431, "headers_too_large"),
    (
        "many-headers",
        OK + "".join(f"X-Key-{i}: {SECRET}\r\n" for i in range(200)) + "\r\n",
        431,
        "headers_too_large",
    ),
]

Listener = Callable[[], Awaitable[int]]


@pytest.fixture
async def admin_port(
    gateway: Gateway, store: KeyStore, tmp_path: Path
) -> AsyncIterator[int]:
    """The admin listener, built as `keygate serve` builds it."""
    settings = build({}, tmp_path)
    app = build_admin_app(settings, store, gateway.proxy.metrics)
    runner = operator_runner(app, settings, gateway.proxy.metrics, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


async def exchange(port: int, raw: str) -> bytes:
    """Send ``raw`` and read everything until the server closes the connection (which it
    must: the request cannot be framed, so nothing after it can be either)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(raw.encode("latin-1"))
        received = b""
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(65536):
                    received += chunk
        return received
    finally:
        writer.transport.abort()


@pytest.mark.parametrize("listener", ["proxy", "admin"])
@pytest.mark.parametrize(("case", "raw", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_a_malformed_request_gets_a_fixed_problem_and_nothing_it_sent_is_logged(
    start_gateway: StartGateway,
    admin_port: int,
    caplog: pytest.LogCaptureFixture,
    listener: str,
    case: str,
    raw: str,
    status: int,
    code: str,
) -> None:
    gateway = await start_gateway()
    port = gateway.port if listener == "proxy" else admin_port
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp.server and aiohttp.access too
    answer = await exchange(port, raw)
    await asyncio.sleep(0.05)  # anything logged after the answer went out
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == str(status).encode(), answer[:300]
    assert SECRET.encode() not in answer
    problem = json.loads(body)
    assert (problem["status"], problem["code"]) == (status, code)
    assert problem["type"] == f"urn:keygate:error:{code}"
    assert SECRET not in caplog.text
    assert all(SECRET not in str(r.args) for r in caplog.records)
    refusals = [r for r in caplog.records if r.name == "keygate.client"]
    assert refusals, "a refused request leaves a log line (without the client's bytes)"
