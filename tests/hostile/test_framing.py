"""Malicious framing from an upstream: bytes after a complete answer (in the same write or a
later one), pipelined forged answers, Content-Length that lies, both Content-Length and
Transfer-Encoding, a duplicated Content-Length, bad chunk sizes, a body after a HEAD answer,
interim 1xx answers, a 101 nobody asked for, and bodies that end with the connection.

Every case checks four things: what client A saw (status, headers: never a forged
Set-Cookie, body), what reached the upstream (requests per connection: a connection whose
answer broke framing is never used again), what A was charged (the usage counter in Redis),
and that the NEXT request, from another key, gets its own correct answer. The gateway's
pool to the upstream holds one connection, so a connection wrongly kept would carry that
next request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.conftest import MakeKey
from tests.hostile.raw_upstream import (
    CLOSE,
    GOOD_BODY,
    GOOD_MICRO,
    Writes,
    call,
    first_then_good,
    metered_gateway,
    metered_key,
    serve_scripted,
)
from tests.proxy.conftest import ServeRaw, StartGateway

COST = b"X-Usage-Cost: 0.02\r\n"  # what A's genuine answer costs
A_MICRO = 20_000
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + COST + b"\r\nok"
# A second answer nobody asked for: a cookie for the victim and a huge cost.
FORGED = (
    b"HTTP/1.1 299 Forged\r\nSet-Cookie: s=x\r\nX-Usage-Cost: 7\r\nContent-Length: 6\r\n\r\nforged"
)
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + COST + b"\r\n"


@dataclass(frozen=True)
class Case:
    writes: Writes  # what the upstream sends for A's request
    status: int  # what A sees
    body: bytes | None  # None: the body was cut short (the connection to A is aborted)
    charged: int  # micro-units charged to A
    requests: list[int] = field(default_factory=lambda: [1, 1])  # per connection, after B
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)  # present in A's answer
    absent: tuple[str, ...] = ()  # absent from A's answer (Set-Cookie always is)
    settle: bool = False  # wait for the upstream connection to end before B's request


CASES: dict[str, Case] = {
    # --- bytes after a complete answer: A gets its answer, the connection is dropped --------
    "forged-answer-in-the-same-write": Case([OK + FORGED], 200, b"ok", A_MICRO),
    "three-pipelined-forged-answers": Case([OK + FORGED + FORGED + FORGED], 200, b"ok", A_MICRO),
    "junk-in-the-same-write": Case([OK + b"\x00\x01junk"], 200, b"ok", A_MICRO),
    # Bytes arriving while the connection is idle in the pool: it is closed on the spot
    # (``settle``: B asks only once the gateway closed it; had B's request been sent in
    # between, the late bytes would be indistinguishable from an answer to it).
    "forged-answer-in-a-later-write": Case([OK, 0.05, FORGED], 200, b"ok", A_MICRO, settle=True),
    "content-length-too-long": Case(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + COST + b"\r\nokEXTRA"], 200, b"ok", A_MICRO
    ),
    # --- Content-Length shorter than the body sent before the upstream closed ---------------
    # The head reached A, so the body is cut (never ended cleanly); the status was relayed,
    # so the stated cost is charged (gateway/proxy/settle.py charges what reached the client).
    "content-length-too-short": Case(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" + COST + b"\r\nabc", 0.05, CLOSE],
        200,
        None,
        A_MICRO,
    ),
    # --- framing that is not valid HTTP: 502 before anything is relayed, nothing charged ----
    "content-length-and-chunked": Case(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
            + COST
            + b"\r\n5\r\nhello\r\n0\r\n\r\n"
        ],
        502,
        b"",
        0,
    ),
    "content-length-twice-equal": Case(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n" + COST + b"\r\nok"],
        502,
        b"",
        0,
    ),
    "content-length-twice-different": Case(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n" + COST + b"\r\nok"],
        502,
        b"",
        0,
    ),
    # Only chunked is undone by the gateway; any other coding would reach the client unnamed
    # (the gateway re-frames the body and drops Transfer-Encoding, a hop-by-hop field).
    "transfer-encoding-gzip": Case(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n" + COST + b"\r\n\x1f\x8b"], 502, b"", 0
    ),
    "transfer-encoding-gzip-then-chunked": Case(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n"
            + COST
            + b"\r\n2\r\nok\r\n0\r\n\r\n"
        ],
        502,
        b"",
        0,
    ),
    "content-length-not-a-number": Case(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n" + COST + b"\r\nok"], 502, b"", 0
    ),
    # A chunk size broken in the write that carried the head: the answer is known to be
    # broken before anything is relayed, so A gets a 502 rather than a truncated 200.
    "chunk-size-not-hex": Case([CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n"], 502, b"", 0),
    "chunk-size-negative": Case([CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n"], 502, b"", 0),
    "chunk-size-overflow": Case([CHUNKED + b"1" + b"0" * 20 + b"\r\nhello\r\n"], 502, b"", 0),
    "chunk-size-then-junk": Case([CHUNKED + b"5 junk\r\nhello\r\n0\r\n\r\n"], 502, b"", 0),
    # Broken in a later write: the head has gone to A by then, so A's body is cut short.
    "chunk-size-broken-later": Case(
        [CHUNKED + b"2\r\nok\r\n", 0.05, b"zz\r\nhello\r\n0\r\n\r\n"], 200, None, A_MICRO
    ),
    # --- HEAD: no body whatever Content-Length says; one sent anyway ends the connection ----
    "head-answer-with-a-body": Case(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n" + COST + b"\r\nbody"],
        200,
        b"",
        A_MICRO,
        method="HEAD",
        headers={"Content-Length": "4"},
    ),
    # A 204 has no body whatever it says: bytes after its head are bytes after the answer.
    "no-content-with-a-body": Case(
        [b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n" + COST + b"\r\nbody"],
        204,
        b"",
        A_MICRO,
    ),
    # --- interim answers: skipped, their headers dropped, the connection kept ---------------
    "interim-100-and-103-then-the-answer": Case(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\nX-Usage-Cost: 5\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n" + COST + b"\r\ndone"
        ],
        201,
        b"done",
        A_MICRO,
        requests=[2],
        absent=("Link",),
    ),
    "interims-in-separate-writes": Case(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n",
            0.02,
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n",
            0.02,
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n" + COST + b"\r\ndone",
        ],
        201,
        b"done",
        A_MICRO,
        requests=[2],
        absent=("Link",),
    ),
    # --- 101 to a request that asked for no upgrade ------------------------------------------
    "101-with-upgrade-headers": Case(
        [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"\r\n" + FORGED
        ],
        502,
        b"",
        0,
    ),
    "101-then-an-answer": Case([b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + OK], 502, b"", 0),
    # --- a body without framing ends with the connection: whole, and never reused -----------
    "close-delimited-body": Case(
        [b"HTTP/1.1 200 OK\r\n" + COST + b"\r\nuntil", 0.02, b" the end", CLOSE],
        200,
        b"until the end",
        A_MICRO,
    ),
    "close-delimited-http-1.0": Case(
        [b"HTTP/1.0 200 OK\r\n" + COST + b"\r\nold style", CLOSE], 200, b"old style", A_MICRO
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_a_malicious_answer_reaches_only_its_own_client(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    case: Case,
) -> None:
    upstream = await serve_scripted(serve_raw, first_then_good(case.writes))
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    b, b_usage = await metered_key(make_key, redis, key_prefix)

    seen = await call(gateway, http, a.secret, method=case.method)
    assert seen.status == case.status, seen
    if case.status == 502:
        assert seen.all("Content-Type")[0].startswith("application/problem+json")
        assert b"upstream_error" in (seen.body or b"")
    else:
        assert seen.body == case.body
    assert seen.all("Set-Cookie") == []
    assert seen.all("X-Usage-Cost") == []  # read by the meter, never relayed
    for name, value in case.headers.items():
        assert seen.all(name) == [value]
    for name in case.absent:
        assert seen.all(name) == []
    assert await a_usage.total() == case.charged

    if case.settle:
        async with asyncio.timeout(2):
            await upstream.peers[0].closed.wait()
    after = await call(gateway, http, b.secret)  # another tenant, next in line
    assert (after.status, after.body, after.all("Set-Cookie")) == (200, GOOD_BODY, [])
    assert await b_usage.total() == GOOD_MICRO
    assert await a_usage.total() == case.charged  # nothing of B's answer reached A's bill
    assert upstream.requests == case.requests
    if case.requests == [1, 1]:  # the first connection was dropped, not pooled
        async with asyncio.timeout(2):
            await upstream.peers[0].closed.wait()


async def test_a_garbage_tail_never_reaches_a_later_exchange(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
) -> None:
    """Every answer carries a forged second answer: each client still gets exactly its own
    answer and cost, and each connection carries exactly one request."""

    def script(connection: int, request: int, head: bytes) -> Writes:
        cost = b"X-Usage-Cost: 0.0%d\r\n" % (connection + 1)
        body = b"n%d" % connection
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body) + cost + b"\r\n" + body
        return [answer + FORGED]

    upstream = await serve_scripted(serve_raw, script)
    gateway = await metered_gateway(start_gateway, upstream)
    for i in range(4):
        key, usage = await metered_key(make_key, redis, key_prefix)
        seen = await call(gateway, http, key.secret)
        assert (seen.status, seen.body, seen.all("Set-Cookie")) == (200, b"n%d" % i, [])
        assert await usage.total() == (i + 1) * 10_000
    assert upstream.requests == [1, 1, 1, 1]
