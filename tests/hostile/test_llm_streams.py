"""LLM routes against peers that frame their messages in ways keygate's rewriting must
survive: a client that sends its body chunked (keygate rewrites it to ask for usage: the
upstream must get the new body's own length), and an upstream that states a
Content-Length for an event stream keygate shortens (the client must get a well-framed
answer, not one that promises bytes it never gets)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import ServeRaw, StartGateway

USAGE = {"prompt_tokens": 1000, "completion_tokens": 2000, "total_tokens": 3000}
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
FIRST = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
LAST = {**CHUNK, "choices": [], "usage": USAGE}  # the usage-only event keygate removes
STREAM = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in (FIRST, LAST))
STREAM += b"data: [DONE]\n\n"
ROUTE = {
    "name": "llm",
    "prefix": "/llm",
    "upstream": "raw",
    "strip_prefix": True,
    "cost": {"llm": "openai", "provider": "openai"},
    "reserve": 0.01,
}


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_rewritten_body_is_sent_with_its_own_length_and_a_stated_length_dropped(
    framing: str,
    start_gateway: StartGateway,
    serve_raw: ServeRaw,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    seen: dict[str, Any] = {}

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = [line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line]
        headers = {name.lower(): value for name, value in lines}
        seen["headers"] = headers
        seen["body"] = await reader.readexactly(int(headers["content-length"]))
        # A Content-Length for the whole stream, usage event included: keygate removes
        # that event from the client's copy, so this length would promise too much.
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            + f"Content-Length: {len(STREAM)}\r\n\r\n".encode()
            + STREAM
        )
        await writer.drain()

    port = await serve_raw(upstream)
    gw = await start_gateway(routes=[ROUTE], upstreams={"raw": {"url": f"http://127.0.0.1:{port}"}})
    issued = await make_key()
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}

    async def chunked() -> Any:  # the client's body, sent in chunks of unknown total size
        data = json.dumps(body).encode()
        yield data[:10]
        yield data[10:]

    # With Content-Length, the client's length is the old body's: the new one is longer.
    async with http.post(
        f"{gw.url}/llm/v1/chat/completions",
        data=chunked() if framing == "chunked" else json.dumps(body).encode(),
        headers={**bearer(issued.secret), "Content-Type": "application/json"},
    ) as response:
        assert response.status == 200
        assert "Content-Length" not in response.headers
        received = await response.read()  # a length promising more would fail here
    sent = json.loads(seen["body"])
    assert sent == {**body, "stream_options": {"include_usage": True}}
    assert "transfer-encoding" not in seen["headers"]
    assert int(seen["headers"]["content-length"]) == len(seen["body"])
    assert b'"usage"' not in received and received.endswith(b"data: [DONE]\n\n")
    await gw.proxy.settlements.drain()
    # 1,000 input and 2,000 output tokens of gpt-4o-mini: $0.00015 + $0.0012
    assert int(await redis.get(f"{key_prefix}u:{{{issued.record.id}}}:t") or 0) == 1350
