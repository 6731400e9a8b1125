"""Sizes an upstream can abuse: a response head that never ends (header lines by the
megabyte, or interim 1xx answers one after another), too many header fields, a status
outside 100..599, and a body far larger than memory should hold.

A head over the cap (by default 64 KiB and 100 fields; ``upstreams.<name>.
max_response_head_bytes`` / ``max_response_headers``) or a status outside 100..599 is a 502
problem with nothing of the upstream's answer relayed, nothing charged, and the connection
closed. A huge body streams through in bounded memory: while the client does not read, the
gateway stops reading from the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.config.load import ConfigError, build
from tests.conftest import MakeKey, bearer
from tests.hostile.raw_upstream import (
    FIXED_MICRO,
    GOOD,
    GOOD_BODY,
    GOOD_MICRO,
    Writes,
    call,
    first_then_good,
    metered_gateway,
    metered_key,
    serve_scripted,
)
from tests.proxy.conftest import ServeRaw, StartGateway, rss_bytes

MiB = 1 << 20
HEAD_CAP = 64 * 1024  # the default max_response_head_bytes
FIELDS_CAP = 100  # the default max_response_headers
# Memory the gateway may grow by while a flood or a huge body passes (the whole test
# process: gateway, upstream and client). A flood of 16 MiB, or a body of 64 MiB, held in
# memory would exceed it.
RSS_BOUND = 32 * MiB
# What a flooding upstream tries to send: far more than loopback socket buffers take (a few
# MiB), so that its writes failing before the end shows the gateway hung up.
FLOOD = 64 * MiB
COST = b"X-Usage-Cost: 0.02\r\n"
PATTERN = bytes(range(256))


@contextlib.asynccontextmanager
async def peak_rss() -> AsyncIterator[Callable[[], int]]:
    """Sample the resident set size every 5 ms; yields a function giving the growth so far
    (peak minus the size at the start)."""
    start = rss_bytes()
    peak = start

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        yield lambda: max(peak, rss_bytes()) - start
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


def _head(status: bytes, fields: list[bytes]) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def _sized_head(total: int) -> bytes:
    """A 200 head of exactly ``total`` bytes (status line to blank line), Content-Length 2,
    padded with header fields of 4 KiB at most (clients refuse longer lines)."""
    fixed = [b"Content-Length: 2", COST.rstrip()]
    size = len(_head(b"200 OK", fixed))
    padding: list[bytes] = []
    left = total - size
    n = 0
    while left > 0:
        overhead = len(b"X-Pad-000: \r\n")
        value = min(4096, left - overhead)
        assert value >= 1, "a size the padding cannot reach exactly"
        padding.append(b"X-Pad-%03d: " % n + b"p" * value)
        left -= overhead + value
        n += 1
    head = _head(b"200 OK", fixed + padding)
    assert len(head) == total
    return head


# --- floods ------------------------------------------------------------------------------------


async def test_a_flood_of_header_lines_is_502_with_nothing_relayed_in_bounded_memory(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
) -> None:
    """64 MiB of header lines (1 KiB each) after a status line: the gateway stops reading at
    the cap, answers 502 and closes, so the upstream's writes fail long before the end (the
    socket buffers take a few MiB at most)."""
    block = b"".join(b"X-Flood-%04d: %s\r\n" % (i, b"f" * 1000) for i in range(64))  # ~64 KiB
    flood_size = FLOOD
    flood: list[bytes | float | None] = [b"HTTP/1.1 200 OK\r\nSet-Cookie: s=x\r\n" + COST]
    flood += [block] * (flood_size // len(block))
    flood += [b"Content-Length: 2\r\n\r\nok"]

    def script(connection: int, request: int, head: bytes) -> Writes:
        return flood if head.startswith(b"GET /m/fixed ") else [GOOD]

    upstream = await serve_scripted(serve_raw, script)
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    b, b_usage = await metered_key(make_key, redis, key_prefix)
    await call(gateway, http, b.secret)  # warm: the pool, the client, the code paths
    await call(gateway, http, b.secret)

    async with peak_rss() as growth:
        seen = await call(gateway, http, a.secret, "/m/fixed")
        async with asyncio.timeout(3):
            await upstream.peers[0].closed.wait()
        grown = growth()
    assert seen.status == 502
    assert seen.all("Content-Type")[0].startswith("application/problem+json")
    assert b"upstream_error" in (seen.body or b"")
    assert seen.all("Set-Cookie") == []
    assert not any(name.startswith("x-flood") for name in seen.headers)
    assert await a_usage.total() == 0  # refunded
    assert upstream.peers[0].written < flood_size  # cut off before the end
    assert grown < RSS_BOUND, f"RSS grew by {grown / MiB:.1f} MiB"
    after = await call(gateway, http, b.secret)
    assert (after.status, after.body) == (200, GOOD_BODY)
    assert await b_usage.total() == 3 * GOOD_MICRO
    assert upstream.requests == [3, 1]


async def test_interim_answers_without_end_are_bounded_by_the_head_cap(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
) -> None:
    """``100 Continue`` after ``100 Continue`` (64 MiB of them), never a final answer: 502 at
    the head cap, well before the 2 s read timeout would give a 504."""
    interims = b"HTTP/1.1 100 Continue\r\n\r\n" * 2048
    writes: list[bytes | float | None] = [interims] * (FLOOD // len(interims))
    upstream = await serve_scripted(serve_raw, first_then_good(writes))
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    seen = await call(gateway, http, a.secret, "/m/fixed")
    assert seen.status == 502
    assert await a_usage.total() == 0
    async with asyncio.timeout(3):
        await upstream.peers[0].closed.wait()
    assert upstream.peers[0].written < FLOOD  # the gateway hung up before the end


async def test_an_interim_head_that_never_ends_is_502(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
) -> None:
    fields = b"".join(b"Link: </asset/%06d>; rel=preload\r\n" % i for i in range(2000))
    writes: list[bytes | float | None] = [b"HTTP/1.1 103 Early Hints\r\n"]
    writes += [fields] * (FLOOD // len(fields))
    upstream = await serve_scripted(serve_raw, first_then_good(writes))
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    seen = await call(gateway, http, a.secret, "/m/fixed")
    assert seen.status == 502
    assert seen.all("Link") == []
    assert await a_usage.total() == 0
    async with asyncio.timeout(3):
        await upstream.peers[0].closed.wait()
    assert upstream.peers[0].written < FLOOD


@pytest.mark.parametrize(
    "flood",
    [
        [b"X-Trailer-%04d: %s\r\n" % (i, b"t" * 1000) for i in range(64)],
        [b"e" * 1024 for _ in range(64)],
    ],
    ids=["trailer-fields", "chunk-extension"],
)
async def test_a_flood_after_a_chunked_body_is_cut_in_bounded_memory(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    flood: list[bytes],
) -> None:
    """A chunked body whose last chunk is followed by trailer fields without end (or a chunk
    whose extension never ends): the bytes between two body bytes are bounded like a head.
    The head has gone to the client, so its body is cut; the upstream is hung up on."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + COST + b"\r\n2\r\nok\r\n"
    start = b"0\r\n" if flood[0].startswith(b"X-") else b"2;"
    block = b"".join(flood)
    writes: list[bytes | float | None] = [head, 0.05, start]
    writes += [block] * (FLOOD // len(block))

    def script(connection: int, request: int, head: bytes) -> Writes:
        return writes if head.startswith(b"GET /m/header ") else [GOOD]

    upstream = await serve_scripted(serve_raw, script)
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    b, _ = await metered_key(make_key, redis, key_prefix)
    await call(gateway, http, b.secret, "/m/fixed")  # warm: the pool, the client, the code
    async with peak_rss() as growth:
        seen = await call(gateway, http, a.secret)
        async with asyncio.timeout(3):
            await upstream.peers[0].closed.wait()
        grown = growth()
    assert (seen.status, seen.body) == (200, None)  # cut: never ended as if whole
    assert upstream.peers[0].written < FLOOD
    assert grown < RSS_BOUND, f"RSS grew by {grown / MiB:.1f} MiB"
    # The status reached the client, so the stated cost is charged (as for any answer cut
    # after its head: gateway/proxy/settle.py).
    assert await a_usage.total() == 20_000


# --- the caps, exactly ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "status"), [(HEAD_CAP, 200), (HEAD_CAP + 1, 502)], ids=["at-the-cap", "one-over"]
)
async def test_the_head_size_cap_is_exact(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    size: int,
    status: int,
) -> None:
    """The cap counts the head from the status line to the blank line; the body's bytes
    (here in the same write) do not count."""
    upstream = await serve_scripted(serve_raw, first_then_good([_sized_head(size) + b"ok"]))
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    seen = await call(gateway, http, a.secret)
    assert seen.status == status
    if status == 200:
        assert seen.body == b"ok"
        assert seen.all("X-Pad-000") == ["p" * 4096]
        assert await a_usage.total() == 20_000
        assert upstream.requests == [1]
    else:
        assert seen.all("X-Pad-000") == []
        assert b"larger than the gateway accepts" in (seen.body or b"")
        assert await a_usage.total() == 0
        async with asyncio.timeout(2):
            await upstream.peers[0].closed.wait()


@pytest.mark.parametrize(
    ("fields", "status"),
    [(FIELDS_CAP, 200), (FIELDS_CAP + 1, 502)],
    ids=["at-the-cap", "one-over"],
)
async def test_the_header_count_cap_is_exact(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    fields: int,
    status: int,
) -> None:
    lines = [b"Content-Length: 2", COST.rstrip()]
    lines += [b"X-Field-%03d: v" % i for i in range(fields - len(lines))]
    upstream = await serve_scripted(serve_raw, first_then_good([_head(b"200 OK", lines) + b"ok"]))
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    seen = await call(gateway, http, a.secret)
    assert seen.status == status
    if status == 200:
        assert seen.body == b"ok"
        assert sum(name.startswith("x-field-") for name in seen.headers) == fields - 2
        assert await a_usage.total() == 20_000
    else:
        assert not any(name.startswith("x-field-") for name in seen.headers)
        assert b"larger than the gateway accepts" in (seen.body or b"")
        assert await a_usage.total() == 0


async def test_the_caps_are_set_per_upstream(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
) -> None:
    """``max_response_head_bytes: 1024`` and ``max_response_headers: 5``: a head of 1025
    bytes, then one of 6 fields, are 502; one of 1024 bytes and 5 fields passes."""
    answers = {
        0: _sized_head(1025) + b"ok",
        1: _head(b"200 OK", [b"Content-Length: 2", b"A: 1", b"B: 2", b"C: 3", b"D: 4", b"E: 5"])
        + b"ok",
    }

    def script(connection: int, request: int, head: bytes) -> Writes:
        if connection in answers:
            return [answers[connection]]
        return [_sized_head(1024) + b"ok"]

    upstream = await serve_scripted(serve_raw, script)
    gateway = await metered_gateway(
        start_gateway, upstream, max_response_head_bytes=1024, max_response_headers=5
    )
    key = await make_key()
    assert (await call(gateway, http, key.secret)).status == 502
    assert (await call(gateway, http, key.secret)).status == 502
    seen = await call(gateway, http, key.secret)
    assert (seen.status, seen.body) == (200, b"ok")
    assert upstream.requests == [1, 1, 1]


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("max_response_head_bytes", 512, "must be an integer >= 1024"),
        ("max_response_head_bytes", "64k", "must be an integer"),
        ("max_response_headers", 0, "must be an integer >= 1"),
    ],
)
def test_the_caps_are_validated_by_name(
    tmp_path: Path, option: str, value: object, problem: str
) -> None:
    raw = {"upstreams": {"llm": {"url": "http://127.0.0.1:9", option: value}}}
    with pytest.raises(ConfigError) as refused:
        build(raw, tmp_path)
    assert any(
        line.startswith(f"upstreams.llm.{option}: {problem}") for line in refused.value.problems
    ), refused.value.problems


# --- statuses outside 100..599 -----------------------------------------------------------------


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
@pytest.mark.parametrize("path", ["/m/fixed", "/m/header"])
async def test_a_status_outside_100_to_599_is_502_and_refunded(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    status: bytes,
    path: str,
) -> None:
    answer = b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n" + COST + b"\r\nok"
    upstream = await serve_scripted(serve_raw, first_then_good([answer]))
    gateway = await metered_gateway(start_gateway, upstream)
    a, a_usage = await metered_key(make_key, redis, key_prefix)
    seen = await call(gateway, http, a.secret, path)
    assert seen.status == 502
    assert b"upstream_error" in (seen.body or b"")
    assert b"not valid HTTP" in (seen.body or b"")
    assert await a_usage.total() == 0  # nothing charged: the reservation is refunded
    after = await call(gateway, http, a.secret, path)
    assert (after.status, after.body) == (200, GOOD_BODY)
    assert await a_usage.total() == (FIXED_MICRO if path == "/m/fixed" else GOOD_MICRO)
    assert upstream.requests == [1, 1]


# --- a huge body -------------------------------------------------------------------------------


async def test_a_huge_body_streams_in_bounded_memory_while_the_client_reads_slowly(
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
) -> None:
    """64 MiB with Content-Length. The client reads 1 MiB, then nothing for 0.5 s: in that
    time the upstream gets to write no more than the socket buffers and the gateway's
    high-water mark take (about 14 MiB here; all of it if the gateway kept reading), and
    memory stays bounded; then the rest arrives whole."""
    size = 64 * MiB
    block = PATTERN * 256  # 64 KiB
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    writes: list[bytes | float | None] = [head, *([block] * (size // len(block)))]
    upstream = await serve_scripted(serve_raw, first_then_good(writes))
    gateway = await metered_gateway(start_gateway, upstream)
    key = await make_key()
    async with peak_rss() as growth:
        async with http.get(f"{gateway.url}/m/fixed", headers=bearer(key.secret)) as response:
            assert response.status == 200
            received = len(await response.content.readexactly(MiB))
            await asyncio.sleep(0.5)
            written_while_paused = upstream.peers[0].written
            grown_while_paused = growth()
            async for chunk in response.content.iter_chunked(MiB):
                start = received % 256  # byte i of the body is i % 256
                assert chunk == (PATTERN * (len(chunk) // 256 + 2))[start : start + len(chunk)]
                received += len(chunk)
        grown = growth()
    assert received == size
    assert written_while_paused < size  # it could not write it all: reading was paused
    assert grown_while_paused < RSS_BOUND, f"RSS grew by {grown_while_paused / MiB:.1f} MiB"
    assert grown < RSS_BOUND, f"RSS grew by {grown / MiB:.1f} MiB"
