"""The auth listener's server (gateway/forward_auth/wire.py) against generated request
streams, its answers read by h11 (the reference parser).

Each example is a run of requests pipelined on one connection: checks in Traefik's
contract (a valid key or a forged one), HEAD checks in Envoy's, and ``POST /v1/verify``
calls with JSON bodies framed by Content-Length or chunked (random chunk sizes, chunk
extensions, trailers); header fields in random order and case, with random extra fields.
The whole stream is cut at random offsets into writes. Expected: one answer per request,
in order, each well framed for h11 (a HEAD answer with no body), the status and key each
request calls for, the connection still usable afterwards, and every allowed check charged
once in Redis.

Seeded, so CI sees the same streams every run; ``KEYGATE_WIRE_FUZZ_EXAMPLES`` sets how
many (default 150).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
from dataclasses import dataclass

import h11
from redis.asyncio import Redis

from gateway.store.record import MICRO
from tests.conftest import MakeKey
from tests.forward_auth.conftest import StartAuth
from tests.forward_auth.conftest import start_auth as start_auth
from tests.proxy.conftest import LOOPBACK
from tests.proxy.conftest import upstream as upstream

EXAMPLES = int(os.environ.get("KEYGATE_WIRE_FUZZ_EXAMPLES", "150"))
COST_MICRO = MICRO // 1000  # each allowed check's fixed cost
ROUTES = [
    {
        "name": "echo",
        "prefix": "/echo",
        "upstream": "demo",
        "scopes": ["echo:read"],
        "cost": {"fixed": COST_MICRO / MICRO},
    }
]
TCHAR = string.ascii_letters + string.digits + "-"
VALUE = string.ascii_letters + string.digits + " -_.,;:/=+()[]{}<>?@!#$%&*'\"~^|`"


@dataclass
class Sent:
    """One generated request: its bytes, the h11 event that stands for it, what it calls
    for."""

    raw: bytes
    event: h11.Request
    body: bytes
    status: int
    key_id: str | None  # the key a 200 names
    verify_valid: bool | None = None  # a /v1/verify call: the answer's "valid"


def cased(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


def extras(rng: random.Random) -> list[tuple[str, str]]:
    fields = []
    for _ in range(rng.randint(0, 5)):
        name = "X-" + "".join(rng.choice(TCHAR) for _ in range(rng.randint(1, 16)))
        value = "".join(rng.choice(VALUE) for _ in range(rng.randint(0, 40))).strip()
        fields.append((name, value))
    return fields


def head(rng: random.Random, method: str, target: str, fields: list[tuple[str, str]]) -> bytes:
    fields = fields + extras(rng)
    rng.shuffle(fields)
    lines = [f"{method} {target} HTTP/1.1", "Host: keygate"]
    lines += [f"{cased(rng, name)}:{rng.choice(['', ' ', '  '])}{value}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def event(method: str, target: str, body: bytes) -> h11.Request:
    headers = [("Host", "keygate")]
    if body:
        headers.append(("Content-Length", str(len(body))))
    return h11.Request(method=method, target=target, headers=headers)


def generate(rng: random.Random, secret: str, key_id: str, verifier: str) -> list[Sent]:
    sent = []
    for _ in range(rng.randint(1, 6)):
        valid = rng.random() < 0.6
        key = secret if valid else "kg_" + "".join(rng.choice(TCHAR) for _ in range(20))
        kind = rng.choice(["traefik", "traefik", "envoy-head", "verify"])
        if kind == "traefik":
            target = "/echo/" + "".join(rng.choice(TCHAR) for _ in range(rng.randint(1, 30)))
            fields = [
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", target),
                ("Authorization", f"Bearer {key}"),
            ]
            raw = head(rng, "GET", "/auth/traefik", fields)
            ev = event("GET", "/auth/traefik", b"")
            sent.append(Sent(raw, ev, b"", 200 if valid else 401, key_id if valid else None))
        elif kind == "envoy-head":
            raw = head(rng, "HEAD", "/auth/envoy/echo/x", [("Authorization", f"Bearer {key}")])
            ev = event("HEAD", "/auth/envoy/echo/x", b"")
            sent.append(Sent(raw, ev, b"", 200 if valid else 401, key_id if valid else None))
        else:
            body = json.dumps({"key": key, "route": "echo", "cost": 0}).encode()
            fields = [("Authorization", f"Bearer {verifier}"), ("Content-Type", "application/json")]
            if rng.random() < 0.5:
                raw = head(rng, "POST", "/v1/verify", [*fields, ("Content-Length", str(len(body)))])
                raw += body
            else:
                raw = head(rng, "POST", "/v1/verify", [*fields, ("Transfer-Encoding", "chunked")])
                raw += chunked(rng, body)
            ev = event("POST", "/v1/verify", body)
            sent.append(Sent(raw, ev, body, 200, None, verify_valid=valid))
    return sent


def chunked(rng: random.Random, body: bytes) -> bytes:
    out, at = b"", 0
    while at < len(body):
        size = rng.randint(1, max(1, len(body) - at))
        extension = rng.choice([b"", b";x=1", b';name="v"'])
        out += b"%x%b\r\n%b\r\n" % (size, extension, body[at : at + size])
        at += size
    trailer = rng.choice([b"", b"X-Trailer: t\r\n"])
    return out + b"0\r\n" + trailer + b"\r\n"


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def read_answers(
    reader: asyncio.StreamReader, sent: list[Sent]
) -> list[tuple[h11.Response, bytes]]:
    """Each answer parsed by h11 as the client of these requests."""
    client = h11.Connection(h11.CLIENT)
    answers: list[tuple[h11.Response, bytes]] = []
    for request in sent:
        client.send(request.event)
        if request.body:
            client.send(h11.Data(data=request.body))
        client.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = b""
        while True:
            got = client.next_event()
            if got is h11.NEED_DATA:
                data = await reader.read(65536)
                assert data, f"the connection closed after {len(answers)} of {len(sent)}"
                client.receive_data(data)
            elif isinstance(got, h11.Response):
                response = got
            elif isinstance(got, h11.Data):
                body += got.data
            elif isinstance(got, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {got!r}")
        assert response is not None
        answers.append((response, body))
        client.start_next_cycle()
    return answers


async def test_generated_request_streams_are_answered_in_order_and_well_framed(
    start_auth: StartAuth, make_key: MakeKey, redis: Redis, key_prefix: str
) -> None:
    gw = await start_auth(routes=ROUTES)
    issued = await make_key(scopes=["echo:read"])
    verifier = await make_key(scopes=["keys:verify"])
    secret, key_id = str(issued.secret), issued.record.id
    rng = random.Random(17)
    allowed = 0
    for example in range(EXAMPLES):
        sent = generate(rng, secret, key_id, str(verifier.secret))
        reader, writer = await asyncio.open_connection(LOOPBACK, gw.port)
        try:
            for piece in cut(rng, b"".join(s.raw for s in sent)):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)
            async with asyncio.timeout(10):
                answers = await read_answers(reader, sent)
            # still usable: one more check on the same connection
            writer.write(
                f"GET /auth/traefik HTTP/1.1\r\nHost: k\r\nX-Forwarded-Method: GET\r\n"
                f"X-Forwarded-Uri: /echo/z\r\nAuthorization: Bearer {secret}\r\n\r\n".encode()
            )
            async with asyncio.timeout(10):
                last = await reader.readuntil(b"\r\n\r\n")
            assert last.startswith(b"HTTP/1.1 200 "), (example, last)
            allowed += 1
        finally:
            writer.transport.abort()
        for request, (response, body) in zip(sent, answers, strict=True):
            where = (example, request.raw[:80])
            assert response.status_code == request.status, where
            headers = {name.decode().lower(): value.decode() for name, value in response.headers}
            if request.verify_valid is not None:
                answer = json.loads(body)
                assert answer["valid"] is request.verify_valid, where
            elif request.status == 200:
                assert headers["x-keygate-key-id"] == request.key_id, where
                allowed += 1
            if request.event.method == b"HEAD":
                assert body == b"", where
    await gw.proxy.settlements.drain()
    spent = int(await redis.get(f"{key_prefix}u:{{{key_id}}}:t") or 0)
    assert spent == allowed * COST_MICRO
