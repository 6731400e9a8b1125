"""The access log: what one line says, that no secret gets in, and one write per loop turn.

The first tests feed ``AccessLog`` contexts built from real requests inside a tiny aiohttp
server. The last one runs ``python -m gateway serve`` as a process, sends it every kind of
good and bad request with keys in every place, and reads all it printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pty
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from gateway.config.load import build
from gateway.config.model import Route, Upstream
from gateway.demo.upstream import start_upstream
from gateway.errors import Outcome
from gateway.policies.llm_usage import TokenUsage
from gateway.policies.routing import Match
from gateway.proxy.access_log import AccessLog
from gateway.proxy.context import KeyIdentity, RequestContext
from tests.conftest import MakeKey
from tests.procs import KEYGATE, clean_env, free_port, http_get, write_config

Client = Callable[..., Awaitable[TestClient[Any, Any]]]
Act = Callable[[web.Request], Awaitable[None]]
ROUTE = Route(name="chat", upstream="llm", path="/v1/chat")
MATCH = Match(ROUTE, Upstream("llm", "http://127.0.0.1:9"), "/v1/chat")
KEY = KeyIdentity("0b7c5d1e-7a0e-4f55-9d55-2f1c3c9a0d11", "ws-a", "u-1", (), None, "")


async def _serve(aiohttp_client: Client, act: Act, target: str, **kwargs: Any) -> None:
    """One real request for ``target`` (sent as encoded) to a server that runs ``act``."""

    async def handler(request: web.Request) -> web.Response:
        await act(request)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    client = await aiohttp_client(app)
    async with client.request(kwargs.pop("method", "GET"), URL(target, encoded=True), **kwargs):
        pass


def _context(request: web.Request, *, keyed: bool = True) -> RequestContext:
    ctx = RequestContext(request, "req-1")
    ctx.match = MATCH
    ctx.key = KEY if keyed else None
    return ctx


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _text(path).splitlines()]


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "access.log"


@pytest.fixture
def json_log(out: Path) -> AsyncIterator[AccessLog]:
    with out.open("wb") as stream:
        yield AccessLog(stream, fmt="json", query_param="api_key")


async def test_a_json_line_holds_every_field(
    aiohttp_client: Client, json_log: AccessLog, out: Path
) -> None:
    async def act(request: web.Request) -> None:
        json_log.record(_context(request), 200, 0.0123456, 0.01, 250_000)

    await _serve(aiohttp_client, act, "/v1/chat?model=m1", method="POST")
    json_log.close()
    [line] = _lines(out)
    assert line.pop("ts").endswith("Z")
    assert line == {
        "request_id": "req-1",
        "route": "chat",
        "method": "POST",
        "path": "/v1/chat",
        "query": "model=m1",
        "status": 200,
        "outcome": "ok",
        "key_id": KEY.id,
        "workspace": "ws-a",
        "cost": 0.25,
        "upstream_ms": 10.0,
        "total_ms": 12.345,  # truncated to the microsecond
    }


async def test_an_llm_answer_adds_its_model_tokens_and_whether_they_were_estimated(
    aiohttp_client: Client, json_log: AccessLog, out: Path
) -> None:
    async def act(request: web.Request) -> None:
        ctx = _context(request)
        ctx.usage = TokenUsage("gpt-4o-mini", input=120, output=40, estimated=True)
        json_log.record(ctx, 200, 0.5, 0.4, 37)

    await _serve(aiohttp_client, act, "/v1/chat", method="POST")
    json_log.close()
    [line] = _lines(out)
    assert (line["cost"], line["model"], line["input_tokens"], line["output_tokens"]) == (
        0.000037,
        "gpt-4o-mini",
        120,
        40,
    )
    assert line["estimated"] is True


async def test_a_denied_request_without_route_or_key_has_nulls(
    aiohttp_client: Client, json_log: AccessLog, out: Path
) -> None:
    async def act(request: web.Request) -> None:
        ctx = RequestContext(request, "req-2")
        ctx.outcome = Outcome.NOT_FOUND
        json_log.record(ctx, 404, 0.0005, None, None)

    await _serve(aiohttp_client, act, "/nowhere")
    json_log.close()
    [line] = _lines(out)
    assert (line["route"], line["key_id"], line["workspace"]) == (None, None, None)
    assert (line["status"], line["outcome"], line["path"], line["query"]) == (
        404,
        "not_found",
        "/nowhere",
        None,
    )
    assert (line["cost"], line["upstream_ms"], line["total_ms"]) == (None, None, 0.5)


async def test_keygates_own_endpoints_are_named_as_in_the_metrics(
    aiohttp_client: Client, json_log: AccessLog, out: Path
) -> None:
    async def act(request: web.Request) -> None:
        ctx = RequestContext(request, "req-3")
        ctx.endpoint = "dialect:konpro"  # what Proxy sets for a dialect's answer
        json_log.record(ctx, 200, 0.002, None, None)

    await _serve(aiohttp_client, act, "/v1/api-keys")
    json_log.close()
    [line] = _lines(out)
    assert (line["route"], line["status"], line["path"]) == ("dialect:konpro", 200, "/v1/api-keys")


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("api_key=kg_SECRET1", "api_key=[redacted]"),
        ("a=1&api_key=kg_SECRET1&b=2", "a=1&api_key=[redacted]&b=2"),
        ("api_key=kg_SECRET1&api_key=kg_SECRET2", "api_key=[redacted]&api_key=[redacted]"),
        ("api%5Fkey=kg_SECRET1", "api%5Fkey=[redacted]"),
        ("api%5fkey=kg%5FSECRET1&x=y+z", "api%5fkey=[redacted]&x=y+z"),
        ("api_key=", "api_key=[redacted]"),
        ("api_keys=fine&xapi_key=fine", "api_keys=fine&xapi_key=fine"),
    ],
)
async def test_the_key_parameter_is_redacted_however_spelled(
    aiohttp_client: Client, json_log: AccessLog, out: Path, query: str, logged: str
) -> None:
    async def act(request: web.Request) -> None:
        assert request.raw_path == f"/v1/chat?{query}"  # the client sent it as written
        json_log.record(_context(request), 401, 0.001, None, None)

    await _serve(aiohttp_client, act, f"/v1/chat?{query}")
    json_log.close()
    [line] = _lines(out)
    assert (line["path"], line["query"]) == ("/v1/chat", logged)
    assert "SECRET" not in _text(out)


async def test_headers_never_reach_the_line(
    aiohttp_client: Client, json_log: AccessLog, out: Path
) -> None:
    async def act(request: web.Request) -> None:
        json_log.record(_context(request), 200, 0.001, 0.001, 0)

    headers = {"Authorization": "Bearer kg_SECRET3", "x-api-key": "kg_SECRET4"}
    await _serve(aiohttp_client, act, "/v1/chat", headers=headers)
    json_log.close()
    assert "SECRET" not in _text(out)
    assert _lines(out)[0]["cost"] == 0.0


async def test_a_text_line_reads_as_one_escaped_line(
    aiohttp_client: Client, out: Path, tmp_path: Path
) -> None:
    with out.open("wb") as stream:
        log = AccessLog(stream, fmt="text", query_param="api_key")

        async def act(request: web.Request) -> None:
            log.record(_context(request), 429, 0.002, None, 1)

        await _serve(aiohttp_client, act, "/v1/chat?api_key=kg_SECRET5&q=a%20b")
        log.close()
    text = _text(out)
    assert "SECRET" not in text
    [line] = text.splitlines()
    stamp, rest = line.split(" ", 1)
    assert stamp.endswith("Z")
    assert rest == (
        "429 ok GET /v1/chat?api_key=[redacted]&q=a%20b route=chat "
        f"key={KEY.id} workspace=ws-a cost=0.000001 upstream_ms=- total_ms=2.000 request_id=req-1"
    )


async def test_lines_of_one_loop_turn_leave_in_one_write(aiohttp_client: Client) -> None:
    # A SEQPACKET socket keeps write boundaries: each recv returns exactly one write.
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with reader, writer, writer.makefile("wb") as stream:
        log = AccessLog(stream, fmt="json", query_param="api_key")

        async def act(request: web.Request) -> None:
            for _ in range(3):
                log.record(_context(request), 200, 0.001, None, None)
            reader.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing is written inside the turn
                reader.recv(65536)
            await asyncio.sleep(0)  # the turn ends: the three lines leave
            for _ in range(2):
                log.record(_context(request), 200, 0.001, None, None)
            await asyncio.sleep(0)

        await _serve(aiohttp_client, act, "/v1/chat")
        log.close()  # nothing left: writes nothing
        writes = []
        while True:
            try:
                writes.append(reader.recv(65536))
            except BlockingIOError:
                break
    assert [w.count(b"\n") for w in writes] == [3, 2]


def test_auto_is_json_off_a_terminal_and_off_means_none(tmp_path: Path) -> None:
    with (tmp_path / "out").open("wb") as stream:
        chosen = AccessLog.from_settings(build({}, tmp_path), stream)
        assert chosen is not None and chosen.format == "json"
        text = build({"log": {"access_format": "text"}}, tmp_path)
        chosen = AccessLog.from_settings(text, stream)
        assert chosen is not None and chosen.format == "text"
        assert AccessLog.from_settings(build({"log": {"access": False}}, tmp_path), stream) is None


def test_auto_is_text_on_a_terminal(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    with open(leader, "rb") as _, open(follower, "wb") as stream:
        chosen = AccessLog.from_settings(build({}, tmp_path), stream)
    assert chosen is not None and chosen.format == "text"


async def test_a_closed_stream_stops_the_log_not_the_request(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    stream: BinaryIO = (tmp_path / "out").open("wb")
    log = AccessLog(stream, fmt="json", query_param="api_key")
    stream.close()

    async def act(request: web.Request) -> None:
        log.record(_context(request), 200, 0.001, None, None)
        await asyncio.sleep(0)
        log.record(_context(request), 200, 0.001, None, None)

    await _serve(aiohttp_client, act, "/v1/chat")
    log.close()


# --- a real `keygate serve` -------------------------------------------------------------------


@pytest.fixture
async def demo_upstream() -> AsyncIterator[int]:
    runner, port = await start_upstream()
    yield port
    await runner.cleanup()


async def test_serve_logs_every_request_and_no_secret(
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    make_key: MakeKey,
    demo_upstream: int,
) -> None:
    port, admin_port = free_port(), free_port()
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "log": {"level": "debug", "format": "json", "access_format": "auto"},
            "keys": {"sources": ["bearer", "api_key_scheme", "x-api-key", "query"]},
            "upstreams": {
                "demo": {"url": f"http://127.0.0.1:{demo_upstream}"},
                "dead": {"url": f"http://127.0.0.1:{free_port()}"},
            },
            "routes": [
                {"name": "echo", "prefix": "/echo", "upstream": "demo", "scopes": ["echo:read"]},
                {"name": "dead", "prefix": "/dead", "upstream": "dead"},
            ],
        },
    )
    good = await make_key(scopes=["echo:read"])
    narrow = await make_key(scopes=["other:scope"])
    assert good.secret is not None and narrow.secret is not None
    unknown = "kg_" + uuid.uuid4().hex + "UNKNOWNsecret"
    odd = "not-a-kg-key-" + uuid.uuid4().hex
    secrets = [good.secret, narrow.secret, unknown, odd]

    # (method, target, headers, expected status, expected outcome, route)
    cases: list[tuple[str, str, dict[str, str], int, str, str | None]] = [
        ("GET", "/echo/a", {}, 401, "missing_key", "echo"),
        ("GET", "/echo/a", {"Authorization": f"Bearer {unknown}"}, 401, "invalid_key", "echo"),
        ("GET", "/echo/a", {"Authorization": f"Bearer {odd}"}, 401, "invalid_key", "echo"),
        ("GET", "/echo/a", {"Authorization": "Bearer two words"}, 401, "invalid_key", "echo"),
        ("GET", "/echo/a", {"Authorization": f"Bearer {good.secret}"}, 200, "ok", "echo"),
        ("GET", "/echo/a", {"Authorization": f"Api-Key {good.secret}"}, 200, "ok", "echo"),
        ("GET", "/echo/a", {"x-api-key": good.secret}, 200, "ok", "echo"),
        ("GET", f"/echo/q?api_key={good.secret}&n=1", {}, 200, "ok", "echo"),
        ("GET", f"/echo/q?api_key={unknown}", {}, 401, "invalid_key", "echo"),
        ("GET", f"/echo/q?api%5Fkey={odd}", {}, 401, "invalid_key", "echo"),
        (
            "GET",
            f"/echo/q?api_key={unknown}",
            {"x-api-key": good.secret},
            400,
            "invalid_request",
            "echo",
        ),
        ("GET", "/echo/a", {"x-api-key": narrow.secret}, 403, "forbidden_scope", "echo"),
        ("GET", "/nowhere", {"x-api-key": good.secret}, 404, "not_found", None),
        ("GET", "/dead/x", {"x-api-key": good.secret}, 502, "upstream_error", "dead"),
    ]
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    process = _start(config, out_path, err_path)
    seen: dict[str, int] = {}
    try:
        await asyncio.to_thread(_wait_ready, process, admin_port)
        async with aiohttp.ClientSession() as session:
            for n, (method, target, headers, _, _, _) in enumerate(cases):
                url = URL(f"http://127.0.0.1:{port}{target}", encoded=True)
                sent = {**headers, "X-Request-Id": f"case-{n}"}
                async with session.request(method, url, headers=sent) as response:
                    await response.read()
                    seen[f"case-{n}"] = response.status
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    stdout, stderr = _text(out_path), _text(err_path)
    for secret in secrets:
        assert secret not in stdout and secret not in stderr
        assert secret[-12:] not in stdout and secret[-12:] not in stderr

    assert seen == {f"case-{n}": case[3] for n, case in enumerate(cases)}
    access = {
        entry["request_id"]: entry
        for entry in (json.loads(line) for line in stdout.splitlines())
        if "request_id" in entry
    }
    assert set(access) == set(seen), "one access line per request (is AccessLog wired?)"
    for n, (method, target, _, status, outcome, route) in enumerate(cases):
        line = access[f"case-{n}"]
        assert (line["method"], line["status"], line["outcome"], line["route"]) == (
            method,
            status,
            outcome,
            route,
        ), (n, target)
        assert line["path"] == target.partition("?")[0]
        assert line["total_ms"] >= 0
        if status in (200, 502):  # authorized: the line names the key
            assert (line["key_id"], line["workspace"]) == (good.record.id, "ws-a"), n
        if status < 300:
            assert line["upstream_ms"] > 0, n
    assert access["case-7"]["query"] == "api_key=[redacted]&n=1"
    assert access["case-9"]["query"] == "api%5Fkey=[redacted]"


def _start(config: Path, out_path: Path, err_path: Path) -> subprocess.Popen[bytes]:
    """``keygate serve`` with its stdout and stderr in files, read after it exits."""
    with out_path.open("wb") as out, err_path.open("wb") as err:
        return subprocess.Popen(
            [*KEYGATE, "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=config.parent,
            env=clean_env(),
        )


def _wait_ready(process: subprocess.Popen[bytes], admin_port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"keygate serve exited {process.returncode}"
        with contextlib.suppress(OSError):
            if http_get(admin_port, "/healthz")[0] == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"keygate serve not ready within {timeout}s")
