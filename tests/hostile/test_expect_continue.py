"""``Expect: 100-continue``: a client that holds its body back until told to send it.

An authorised request gets ``100 Continue`` at once (long before curl's 1 s fallback; the raw
client here gives up after 0.5 s), then its upload is forwarded, without the Expect header.
A refusal (401, 402, 403, 404, 429) arrives before anything is uploaded, says
``Connection: close`` and the connection is closed at once: keygate does not sit waiting
for a body the client was never asked for. The upstream never sees a refused request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.store.record import RateLimitSpec
from gateway.store.secrets import generate
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    LOOPBACK,
    Gateway,
    Upstream,
    bad_checksum,
)

CONTINUE_WITHIN = 0.5  # seconds the raw client waits for 100 Continue (curl waits 1)
CLOSED_WITHIN = 1.0  # after a refusal; aiohttp would otherwise linger 10 s for the body


@dataclass
class Exchange:
    continued: bool  # 100 Continue came, and the body was sent after it
    status: int
    head: str
    body: bytes
    closed: bool  # after a refusal: the server closed the connection once it answered

    def json(self) -> Any:
        return json.loads(self.body)


async def _response(reader: asyncio.StreamReader, within: float) -> tuple[int, str, bytes]:
    async with asyncio.timeout(within):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        length = re.search(r"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else b""
    return status, head, body


async def expecting(
    port: int, method: str, path: str, secret: str | None, body: bytes
) -> Exchange:
    """Send the head with ``Expect: 100-continue``; send ``body`` only after a 100."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        auth = f"Authorization: Bearer {secret}\r\n" if secret is not None else ""
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        try:
            status, head, answer = await _response(reader, CONTINUE_WITHIN)
        except TimeoutError:
            raise AssertionError(
                f"no answer to the head within {CONTINUE_WITHIN}s: a client would have "
                "given up waiting for 100 Continue"
            ) from None
        continued = status == 100
        if continued:
            assert answer == b""
            writer.write(body)
            status, head, answer = await _response(reader, 5.0)
        closed = False
        if not continued:  # a refusal: the connection must not wait for the body
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(CLOSED_WITHIN):
                    closed = await reader.read(1) == b""
        return Exchange(continued, status, head, answer, closed)
    finally:
        writer.transport.abort()


BODY = b'{"model": "demo-small", "input": "hello"}'


async def test_an_authorised_upload_gets_100_continue_then_is_forwarded_without_expect(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream
) -> None:
    key = await make_key(scopes=ECHO_SCOPES)
    done = await expecting(gateway.port, "POST", "/echo/upload", key.secret, BODY)
    assert done.continued
    assert done.status == 200, done.body
    echo = done.json()
    assert echo["body"] == BODY.decode()
    assert "Expect" not in echo["headers"]
    assert [hit.headers.get("Expect") for hit in upstream.hits] == [None]


async def test_a_restricted_key_is_asked_for_the_body_that_names_its_resource(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream
) -> None:
    key = await make_key(resources=["demo-small"])
    allowed = await expecting(gateway.port, "POST", "/infer", key.secret, BODY)
    assert (allowed.continued, allowed.status) == (True, 200)
    assert allowed.json()["body"] == BODY.decode()
    other = json.dumps({"model": "demo-large"}).encode()
    refused = await expecting(gateway.port, "POST", "/infer", key.secret, other)
    assert (refused.continued, refused.status) == (True, 403)  # the body decided
    assert len(upstream.hits) == 1


async def _refusal(done: Exchange, status: int, upstream: Upstream, hits: int = 0) -> None:
    assert not done.continued, "asked for the body of a request it then refused"
    assert done.status == status, done.body
    assert re.search(r"(?i)\r\nconnection: close\r\n", done.head), done.head
    assert done.closed, "the connection stayed open, waiting for a body never asked for"
    assert len(upstream.hits) == hits


@pytest.mark.parametrize("case", ["missing", "never-issued", "bad-checksum"])
async def test_a_401_comes_before_any_upload_and_the_connection_closes(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream, case: str
) -> None:
    key = await make_key(scopes=ECHO_SCOPES)
    assert key.secret is not None
    secret = {
        "missing": None,
        "never-issued": generate("kg_"),  # well formed: only the store can refuse it
        "bad-checksum": bad_checksum(key.secret),
    }[case]
    done = await expecting(gateway.port, "POST", "/echo/upload", secret, BODY)
    await _refusal(done, 401, upstream)


async def test_a_403_for_a_missing_scope_comes_before_any_upload(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream
) -> None:
    key = await make_key(scopes=["echo:read"])  # POST needs echo:write
    done = await expecting(gateway.port, "POST", "/echo/upload", key.secret, BODY)
    await _refusal(done, 403, upstream)


async def test_a_404_comes_before_any_upload(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream
) -> None:
    key = await make_key(scopes=ECHO_SCOPES)
    done = await expecting(gateway.port, "POST", "/nowhere", key.secret, BODY)
    await _refusal(done, 404, upstream)


async def test_a_429_comes_before_any_upload(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await make_key(scopes=ECHO_SCOPES, rate_limit=RateLimitSpec(1, 60))
    async with http.post(f"{gateway.url}/echo/a", data=b"x", headers=bearer(key.secret)) as r:
        assert r.status == 200
    done = await expecting(gateway.port, "POST", "/echo/upload", key.secret, BODY)
    await _refusal(done, 429, upstream, hits=1)


async def test_a_402_comes_before_any_upload(
    start_cost_gateway: Any, make_key: MakeKey, upstream: Upstream
) -> None:
    gateway: Gateway = await start_cost_gateway()
    key = await make_key(limit_micro=0)
    done = await expecting(gateway.port, "POST", "/c/fixed", key.secret, BODY)
    await _refusal(done, 402, upstream)
