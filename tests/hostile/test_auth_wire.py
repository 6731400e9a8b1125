"""The auth listener's own HTTP/1.1 server (gateway/forward_auth/wire.py) against clients
that misbehave: requests pipelined back to back, heads and bodies dripped or stalled,
malformed and oversized heads, TLS on the plain port, bodies over the cap, half-closed
and vanishing clients, Upgrade requests, more connections than the cap.

Every test talks to the listener over a raw socket, as nginx, Traefik, Caddy and Envoy do,
and asserts what a client sees on the wire (status, headers, body, the connection closed
or kept) and what an operator sees in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.forward_auth.wire import MAX_BODY, MAX_FIELD, MAX_FIELDS, MAX_TARGET
from gateway.store.record import MICRO
from tests.conftest import MakeKey
from tests.forward_auth.conftest import AuthGateway, StartAuth
from tests.forward_auth.conftest import start_auth as start_auth
from tests.forward_auth.test_auth_listener import ROUTES
from tests.hostile.test_slowness import closed_by_server, counted
from tests.proxy.conftest import LOOPBACK, Upstream

SLACK = 1.0  # seconds beyond a configured timeout before a test calls the server late


async def connections_become(gw: AuthGateway, wanted: int) -> None:
    """Wait (3 s at most) for keygate_client_connections{listener="auth"} to read ``wanted``."""
    for _ in range(150):
        if counted(gw, "keygate_client_connections", listener="auth") == wanted:
            return
        await asyncio.sleep(0.02)
    seen = counted(gw, "keygate_client_connections", listener="auth")
    raise AssertionError(f"the auth listener holds {seen} connections, not {wanted}")


class Answer:
    """One response read off the wire."""

    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        self.body = body

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/problem+json")
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


async def answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer:
    """One response framed by Content-Length (the only framing this listener sends)."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        parsed = Answer(head, b"")
        length = int(parsed.headers["content-length"])
        if not head_only:
            parsed.body = await reader.readexactly(length)
    return parsed


async def opened(gw: AuthGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LOOPBACK, gw.port)


async def one_check(gw: AuthGateway, secret: str | None) -> int:
    """The status of one check on a connection of its own."""
    reader, writer = await opened(gw)
    try:
        writer.write(traefik_check(secret))
        return (await answer(reader)).status
    finally:
        writer.transport.abort()


def traefik_check(secret: str | None, *, extra: str = "", version: str = "1.1") -> bytes:
    auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
    return (
        f"GET /auth/traefik HTTP/{version}\r\nHost: keygate\r\n"
        f"X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /echo/x\r\n{auth}{extra}\r\n"
    ).encode()


def post(path: str, body: bytes, secret: str | None, *, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def spent(redis: Redis, key_prefix: str, key_id: str) -> int:
    return int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)


# --- keep-alive and pipelining ---------------------------------------------------------------


async def test_checks_on_one_connection_are_framed_and_kept_alive(
    start_auth: StartAuth, make_key: MakeKey, redis: Redis, key_prefix: str
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    try:
        for _ in range(3):
            writer.write(traefik_check(issued.secret))
            allowed = await answer(reader)
            assert allowed.status == 200
            assert allowed.headers["x-keygate-key-id"] == issued.record.id
            assert allowed.headers["content-length"] == "0" and allowed.body == b""
            assert re.fullmatch(
                r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", allowed.headers["date"]
            )
            assert "connection" not in allowed.headers
    finally:
        writer.transport.abort()
    await gw.proxy.settlements.drain()
    assert await spent(redis, key_prefix, issued.record.id) == 3 * MICRO // 100


async def test_pipelined_checks_are_answered_in_order(
    start_auth: StartAuth, make_key: MakeKey, redis: Redis, key_prefix: str
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    other = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    secrets = [issued.secret, None, other.secret, "kg_forged", issued.secret] * 4
    try:
        writer.write(b"".join(traefik_check(secret) for secret in secrets))
        answers = [await answer(reader) for _ in secrets]
    finally:
        writer.transport.abort()
    expected = [200 if secret in (issued.secret, other.secret) else 401 for secret in secrets]
    assert [a.status for a in answers] == expected
    owners = [a.headers.get("x-keygate-key-id") for a in answers]
    wanted = {issued.secret: issued.record.id, other.secret: other.record.id}
    assert owners == [wanted.get(secret or "") for secret in secrets]
    await gw.proxy.settlements.drain()
    assert await spent(redis, key_prefix, issued.record.id) == 8 * MICRO // 100
    assert await spent(redis, key_prefix, other.record.id) == 4 * MICRO // 100


async def test_more_pipelined_requests_than_the_queue_holds_are_all_answered(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    try:  # reading pauses past the queue's depth and resumes: none is lost or reordered
        writer.write(traefik_check(issued.secret) * 200)
        statuses = [(await answer(reader)).status for _ in range(200)]
        writer.write(traefik_check(None))
        assert (await answer(reader)).status == 401
    finally:
        writer.transport.abort()
    assert statuses == [200] * 200


async def test_http_1_0_and_connection_close_end_the_connection_after_the_answer(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    for request in (
        traefik_check(issued.secret, version="1.0"),
        traefik_check(issued.secret, extra="Connection: close\r\n"),
    ):
        reader, writer = await opened(gw)
        try:
            writer.write(request + traefik_check(issued.secret))  # the second is never read
            first = await answer(reader)
            assert first.status == 200 and first.headers["connection"] == "close"
            assert await closed_by_server(reader, within=2) == b""
        finally:
            writer.transport.abort()


async def test_a_head_check_gets_no_body_and_the_next_request_still_parses(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    head = "HEAD /auth/envoy/echo/x HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer {}\r\n\r\n"
    try:
        writer.write(head.format("kg_forged").encode() + head.format(issued.secret).encode())
        refused = await answer(reader, head_only=True)
        assert refused.status == 401 and int(refused.headers["content-length"]) > 0
        allowed = await answer(reader, head_only=True)  # misframed if a body had been sent
        assert allowed.status == 200
        assert allowed.headers["x-keygate-key-id"] == issued.record.id
    finally:
        writer.transport.abort()


# --- slow and idle clients ---------------------------------------------------------------


async def test_a_dripped_head_is_cut_off_at_the_header_timeout(start_auth: StartAuth) -> None:
    gw = await start_auth(routes=ROUTES, client={"header_timeout": 0.5})
    reader, writer = await opened(gw)
    head = traefik_check("k" * 400)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with contextlib.suppress(ConnectionError):
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                if reader.at_eof():
                    break
                await asyncio.sleep(0.02)
        assert await closed_by_server(reader, within=0.5 + SLACK) == b""  # closed, unanswered
    finally:
        writer.transport.abort()
    assert loop.time() - started < 0.5 + SLACK
    assert counted(gw, "keygate_client_timeouts_total", listener="auth", phase="head") == 1


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    start_auth: StartAuth,
) -> None:
    gw = await start_auth(routes=ROUTES, client={"header_timeout": 0.3})
    reader, writer = await opened(gw)
    try:
        assert await closed_by_server(reader, within=0.3 + SLACK) == b""
    finally:
        writer.transport.abort()
    assert counted(gw, "keygate_client_timeouts_total", listener="auth", phase="head") == 1


async def test_an_idle_keep_alive_connection_is_closed_at_the_keepalive_timeout(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES, client={"keepalive_timeout": 0.4})
    issued = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    try:
        writer.write(traefik_check(issued.secret))
        assert (await answer(reader)).status == 200
        await asyncio.sleep(0.2)  # within the idle window: still served
        writer.write(traefik_check(issued.secret))
        assert (await answer(reader)).status == 200
        assert await closed_by_server(reader, within=0.4 + SLACK) == b""
    finally:
        writer.transport.abort()
    assert counted(gw, "keygate_client_timeouts_total", listener="auth", phase="idle") == 1
    assert counted(gw, "keygate_client_timeouts_total", listener="auth", phase="head") == 0


async def test_a_stalled_body_gets_408_and_a_slow_one_is_served(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES, client={"body_timeout": 0.4, "min_upload_rate": 20})
    verifier = await make_key(scopes=["keys:verify"])
    issued = await make_key(scopes=["echo:read"])
    body = json.dumps({"key": issued.secret, "route": "echo", "padding": "x" * 40}).encode()
    reader, writer = await opened(gw)
    try:  # the head and 10 bytes, then nothing
        writer.write(post("/v1/verify", body, verifier.secret)[: -len(body) + 10])
        stalled = await answer(reader)
        assert stalled.status == 408
        assert stalled.problem()["status"] == 408
        assert await closed_by_server(reader, within=SLACK) == b""
    finally:
        writer.transport.abort()
    assert counted(gw, "keygate_client_timeouts_total", listener="auth", phase="body") == 1
    reader, writer = await opened(gw)
    try:  # 9 bytes (over 0.4 s * 20 B/s) every 0.2 s: slow, but progressing
        request = post("/v1/verify", body, verifier.secret)
        head_end = request.index(b"\r\n\r\n") + 4
        writer.write(request[:head_end])
        for start in range(head_end, len(request), 9):
            writer.write(request[start : start + 9])
            await asyncio.sleep(0.2)
        served = await answer(reader)
        assert served.status == 200 and json.loads(served.body)["valid"] is True
    finally:
        writer.transport.abort()
    assert counted(gw, "keygate_client_timeouts_total", listener="auth", phase="body") == 1


# --- malformed and oversized requests ------------------------------------------------------


def malformed_requests(secret: str) -> list[tuple[bytes, int, str]]:
    auth = f"Authorization: Bearer {secret}\r\n"
    many = "".join(f"X-Field-{i}: v\r\n" for i in range(MAX_FIELDS + 1))
    return [
        (f"GET /{'a' * (MAX_TARGET + 1)} HTTP/1.1\r\n{auth}\r\n".encode(), 414, "target"),
        (
            f"GET /auth/traefik HTTP/1.1\r\nX-Long: {'v' * (MAX_FIELD + 1)}\r\n{auth}\r\n".encode(),
            431,
            "header field",
        ),
        (f"GET /auth/traefik HTTP/1.1\r\n{auth}{many}\r\n".encode(), 431, "too many header"),
        (f"GET /auth/traefik HTTP/1.1\r\n{auth}Bad Header: x\r\n\r\n".encode(), 400, ""),
        (f"GET /auth/traefik HTTP/9.9\r\n{auth}\r\n".encode(), 400, ""),
        (f"G@T /auth/traefik HTTP/1.1\r\n{auth}\r\n".encode(), 400, ""),
        (
            f"GET /auth/traefik HTTP/1.1\r\n{auth}Content-Length: 1\r\n"
            "Content-Length: 2\r\n\r\nab".encode(),
            400,
            "",
        ),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + secret.encode(), 400, "not TLS"),
    ]


async def test_malformed_heads_get_a_fixed_problem_that_echoes_nothing(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    secret = str(issued.secret)
    for request, status, detail in malformed_requests(secret):
        reader, writer = await opened(gw)
        try:
            writer.write(request)
            refused = await answer(reader)
            assert await closed_by_server(reader, within=3) == b""
        finally:
            writer.transport.abort()
        assert refused.status == status, request[:60]
        problem = refused.problem()
        assert problem["status"] == status and detail in problem["detail"], problem
        assert refused.headers["connection"] == "close"
        assert secret.encode() not in refused.body
        assert "x-keygate-key-id" not in refused.headers
    # the listener is still well
    assert await one_check(gw, issued.secret) == 200


async def test_a_malformed_request_behind_good_ones_is_answered_after_them(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    try:
        writer.write(traefik_check(issued.secret) * 2 + b"NOT HTTP AT ALL\r\n\r\n")
        statuses = [(await answer(reader)).status for _ in range(3)]
        assert await closed_by_server(reader, within=3) == b""
    finally:
        writer.transport.abort()
    assert statuses == [200, 200, 400]


async def test_a_body_over_the_cap_is_refused_announced_or_streamed(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    verifier = await make_key(scopes=["keys:verify"])
    announced = (
        f"POST /v1/verify HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer {verifier.secret}\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    reader, writer = await opened(gw)
    try:  # refused from the head alone, before any of the body is sent
        writer.write(announced)
        refused = await answer(reader)
        assert refused.status == 413 and refused.problem()["status"] == 413
    finally:
        writer.transport.abort()
    chunked = (
        f"POST /v1/verify HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer {verifier.secret}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    reader, writer = await opened(gw)
    sent = 0

    async def send() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            while sent <= 2 * MAX_BODY:
                writer.write(chunk)
                await writer.drain()
                sent += 65536

    sender = asyncio.create_task(send())
    try:  # refused once it passes the cap; the client, still sending, reads the answer
        writer.write(chunked)
        refused = await answer(reader)
        assert refused.status == 413 and refused.headers["connection"] == "close"
    finally:
        sender.cancel()
        writer.transport.abort()
    assert MAX_BODY <= sent < 2 * MAX_BODY  # refused at the cap, not before, not after all


# --- bodies the listener reads ---------------------------------------------------------------


async def test_expect_100_continue_is_honoured_before_the_body(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    verifier = await make_key(scopes=["keys:verify"])
    issued = await make_key(scopes=["echo:read"])
    body = json.dumps({"key": issued.secret, "route": "echo"}).encode()
    request = post("/v1/verify", body, verifier.secret, extra="Expect: 100-continue\r\n")
    reader, writer = await opened(gw)
    try:
        writer.write(request[: -len(body)])
        async with asyncio.timeout(3):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        verified = await answer(reader)
        assert verified.status == 200 and json.loads(verified.body)["key_id"] == issued.record.id
    finally:
        writer.transport.abort()


async def test_a_chunked_body_is_read_whole(start_auth: StartAuth, make_key: MakeKey) -> None:
    gw = await start_auth(routes=ROUTES)
    verifier = await make_key(scopes=["keys:verify"])
    issued = await make_key(scopes=["echo:read"])
    body = json.dumps({"key": issued.secret, "method": "GET", "path": "/echo/y"}).encode()
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    request = (
        f"POST /v1/verify HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer {verifier.secret}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunks
    reader, writer = await opened(gw)
    try:
        for start in range(0, len(request), 11):  # arriving in pieces, as a slow client sends
            writer.write(request[start : start + 11])
            await asyncio.sleep(0)
        verified = await answer(reader)
    finally:
        writer.transport.abort()
    assert verified.status == 200
    assert json.loads(verified.body)["key_id"] == issued.record.id


# --- clients that leave, half-close or upgrade -----------------------------------------------


async def test_a_half_closed_client_still_gets_its_answers(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    try:
        writer.write(traefik_check(issued.secret) + traefik_check(None))
        writer.write_eof()
        statuses = [(await answer(reader)).status for _ in range(2)]
        assert await closed_by_server(reader, within=2) == b""
    finally:
        writer.transport.abort()
    assert statuses == [200, 401]


async def test_an_upgrade_request_is_checked_never_switched_then_closed(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    reader, writer = await opened(gw)
    upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    try:
        writer.write(traefik_check(issued.secret, extra=upgrade) + b"\x81\x05hello")
        checked = await answer(reader)
        assert checked.status == 200 and checked.headers["connection"] == "close"
        assert await closed_by_server(reader, within=2) == b""
    finally:
        writer.transport.abort()


async def test_clients_leaving_mid_check_leave_nothing_behind(
    start_auth: StartAuth, make_key: MakeKey, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])

    async def leave() -> None:
        _, writer = await opened(gw)
        writer.write(traefik_check(issued.secret) * 3)
        await writer.drain()
        writer.transport.abort()  # before any answer can come

    await asyncio.gather(*(leave() for _ in range(50)))
    assert await one_check(gw, issued.secret) == 200
    await connections_become(gw, 0)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_connections_beyond_the_cap_are_refused_and_counted(
    start_auth: StartAuth, make_key: MakeKey
) -> None:
    gw = await start_auth(routes=ROUTES, client={"max_connections": 2})
    issued = await make_key(scopes=["echo:read"])
    held = [await opened(gw) for _ in range(2)]
    try:
        for reader, writer in held:  # both admitted and served
            writer.write(traefik_check(issued.secret))
            assert (await answer(reader)).status == 200
        reader, writer = await opened(gw)
        with contextlib.suppress(ConnectionError):
            writer.write(traefik_check(issued.secret))
        assert await closed_by_server(reader, within=2) == b""  # closed unanswered
        writer.transport.abort()
        assert counted(gw, "keygate_client_connections_refused_total", listener="auth") == 1
        assert counted(gw, "keygate_client_connections", listener="auth") == 2
        held.pop()[1].transport.abort()
        await connections_become(gw, 1)
        reader, writer = await opened(gw)
        held.append((reader, writer))
        writer.write(traefik_check(issued.secret))
        assert (await answer(reader)).status == 200
    finally:
        for _, writer in held:
            writer.transport.abort()


async def test_the_upstream_is_never_reached_by_a_check(
    start_auth: StartAuth, make_key: MakeKey, upstream: Upstream
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    assert await one_check(gw, issued.secret) == 200
    assert upstream.hits == []


async def test_an_original_target_that_is_no_url_is_a_bad_request_not_a_failure(
    start_auth: StartAuth, make_key: MakeKey, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    nginx = (
        "GET /auth/nginx HTTP/1.1\r\nHost: keygate\r\nX-Original-Method: GET\r\n"
        f"X-Original-URI: //[::1/echo/x\r\nAuthorization: Bearer {issued.secret}\r\n\r\n"
    ).encode()
    traefik = traefik_check(issued.secret).replace(b"Uri: /echo/x", b"Uri: //[::1/echo/x")
    reader, writer = await opened(gw)
    try:
        writer.write(nginx + traefik + traefik_check(issued.secret))
        mapped, refused, allowed = [await answer(reader) for _ in range(3)]
    finally:
        writer.transport.abort()
    assert mapped.status == 403 and mapped.headers["x-keygate-status"] == "400"
    assert refused.status == 400
    assert "target is not a valid URL" in refused.problem()["detail"]
    assert allowed.status == 200  # the connection was kept: the refusals were ordinary
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
