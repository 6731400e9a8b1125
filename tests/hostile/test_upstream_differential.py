"""Differential test of the upstream client (gateway/proxy/upstream_http.py) against h11.

Hypothesis generates upstream answers: valid ones (random statuses, reasons, header fields,
interim 1xx answers, bodies framed by Content-Length, chunked with extensions and trailers,
or ending with the connection; HTTP/1.1 and 1.0; Connection: close / keep-alive), and
hostile ones (truncated, with a tail of garbage or a forged second answer, Content-Length
that lies or is duplicated, both Content-Length and Transfer-Encoding, broken chunk sizes,
statuses outside 100..599, 101, bare LF, obs-fold, control characters). Each is split at
random offsets into several writes and sent by a real loopback server to keygate's real
client (``UpstreamPool``), and parsed by h11, the reference.

Compared, per exchange: the status, reason and header fields; the body; whether the answer
was whole; and the reuse decision (a connection may be kept only if the answer was whole
and keep-alive and nothing followed it; observed at the upstream: once every byte has
reached keygate, the connection is either still open, pooled, or closed by keygate). Where
keygate is deliberately stricter than h11, or deliberately more cautious about reuse, the
generator tags the exchange and the tag's comment says why.

``KEYGATE_FUZZ_EXAMPLES`` sets the number of examples (default 1000: a few seconds; 10,000
take about 20 s); the run is derandomized and keeps no example database, so CI sees the
same examples every time. The client runs on uvloop, as keygate does in production.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import TypeVar

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.proxy.upstream_http import UpstreamError, UpstreamPool

EXAMPLES = int(os.environ.get("KEYGATE_FUZZ_EXAMPLES", "1000"))
WITHIN = 2.0  # seconds an exchange may take before it counts as hung (a divergence)

Head = tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]  # status, reason, fields
T = TypeVar("T")

# --- why keygate may differ from h11 (the tags the generator puts on an exchange) --------------

# keygate refuses (502) what h11 accepts, on purpose:
STRICTER = {
    # RFC 9112 §6.3 lets a recipient either reject or merge equal duplicates; a duplicated
    # Content-Length is a classic smuggling vector, so llhttp (and keygate) reject it.
    "duplicate-content-length",
    # RFC 9112 §6.1: Content-Length with Transfer-Encoding "ought to be handled as an
    # error"; h11 lets Transfer-Encoding win, llhttp refuses.
    "content-length-and-chunked",
    # RFC 9110 §15: status codes are 100..599; h11 takes any three digits.
    "status-600-999",
    # RFC 9112 §2.2: a recipient MAY take a bare LF as a line end; llhttp does not.
    "bare-lf",
    # RFC 9112 §5.2: a gateway receiving obs-fold in a response MAY answer 502 instead.
    "obs-fold",
    # RFC 9110 §5.5: a recipient of a control character in a field value MUST reject the
    # message or replace it with SP; llhttp rejects, h11 passes some through. Likewise in the
    # reason phrase (RFC 9112 §4 allows only HTAB, SP, VCHAR and obs-text there).
    "control-in-value",
    "control-in-reason",
}
# keygate keeps a connection h11 would close, on purpose:
MAY_REUSE = {
    # RFC 9112 §9.3: an HTTP/1.0 response with "Connection: keep-alive" may persist; llhttp
    # honours it, h11 never reuses HTTP/1.0.
    "http-1.0-keep-alive",
    # llhttp skips CR and LF before a start line, so empty lines after an answer in the same
    # read are invisible to keygate (they cannot start or forge an answer); h11 counts them
    # as bytes left over.
    "crlf-tail",
}
# keygate closes a connection h11 would keep, on purpose:
MAY_CLOSE = {
    # llhttp cannot be told that an answer to HEAD has no body, so keygate never reuses the
    # connection after one (gateway/proxy/upstream_http.py, on_headers_complete).
    "head-request",
}


@dataclass(frozen=True)
class Exchange:
    method: str
    parts: tuple[bytes, ...]  # the answer, as the upstream writes it
    closes: bool  # the upstream closes the connection after the last part
    tags: frozenset[str] = frozenset()

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


@dataclass
class Seen:
    head: Head | None = None  # None: no (final) head was given
    body: bytes = b""
    whole: bool = False  # the answer completed
    reusable: bool = False  # the connection may serve another exchange
    # h11 only, why it would not reuse the connection: the answer's own keep-alive (HTTP/1.1
    # and no "Connection: close") and the bytes left over after it.
    keep_alive: bool = False
    left_over: bytes = b""


# --- the generator ------------------------------------------------------------------------------

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
# Field names the generator sets on purpose (framing, connection management), never at random.
RESERVED = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade"}


class Choices:
    """Every decision of the generator, read from one byte string that hypothesis draws (and
    shrinks: smaller bytes mean earlier options and shorter strings; past the end every
    choice is the first). The bytes of strings come from a generator seeded by the first
    four, so that 128 bytes of choices describe a whole exchange: one small draw per example
    rather than a hundred keeps generating well under the cost of the exchange itself."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._at = 4
        self._content = random.Random(int.from_bytes(raw[:4], "big"))

    def _byte(self) -> int:
        at = self._at
        if at >= len(self._raw):
            return 0
        self._at = at + 1
        return self._raw[at]

    def number(self, low: int, high: int) -> int:
        span = high - low + 1
        n = self._byte()
        if span > 256:
            n = n << 8 | self._byte()
        return low + n % span

    def pick(self, options: Sequence[T]) -> T:
        return options[self.number(0, len(options) - 1)]

    def chance(self, percent: int) -> bool:
        return self.number(0, 99) < percent

    def bytes_of(self, alphabet: bytes, low: int, high: int) -> bytes:
        return bytes(self._content.choices(alphabet, k=self.number(low, high)))

    def binary(self, high: int) -> bytes:
        return self._content.randbytes(self.number(0, high))


def _name(c: Choices) -> bytes:
    name = c.bytes_of(TCHAR, 1, 8)
    return b"X-" + name if name.lower() in RESERVED else name


def _value(c: Choices) -> bytes:
    """Visible characters and obs-text, spaces and tabs inside, and sometimes around them
    (optional whitespace: not part of the value)."""
    words = [c.bytes_of(VCHAR, 1, 8) for _ in range(c.number(0, 2))]
    inner = c.pick([b" ", b"\t", b"  "]).join(words)
    return c.pick([b"", b"", b" ", b"\t", b"  "]) + inner + c.pick([b"", b"", b" ", b"\t "])


def _fields(c: Choices, most: int) -> list[tuple[bytes, bytes]]:
    return [(_name(c), _value(c)) for _ in range(c.number(0, most))]


def _reason(c: Choices) -> bytes:
    if c.chance(50):
        return c.pick([b"OK", b"Not Found", b"", b"Internal Server Error"])
    return c.bytes_of(VCHAR + b" \t", 0, 12).lstrip(b" \t")


def _status(c: Choices) -> int:
    if c.chance(50):
        return c.pick([200, 201, 204, 206, 301, 304, 400, 404, 429, 500, 502, 503])
    return c.number(200, 599)


def _head(version: bytes, status: int, reason: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    line = b"HTTP/" + version + b" %03d" % status + ((b" " + reason) if reason else b"")
    return line + b"\r\n" + b"".join(n + b":" + v + b"\r\n" for n, v in fields) + b"\r\n"


def _extension(c: Choices) -> bytes:
    if c.chance(70):
        return b""
    return b";" + _name(c) + (b"=" + _name(c) if c.chance(50) else b"")


def _chunked(c: Choices, body: bytes) -> bytes:
    out = bytearray()
    rest = body
    while rest:
        size = c.number(1, len(rest))
        piece, rest = rest[:size], rest[size:]
        out += c.pick([b"%x", b"%X", b"0%x"]) % size + _extension(c) + b"\r\n" + piece + b"\r\n"
    out += b"0" + _extension(c) + b"\r\n"
    for name, value in _fields(c, 2):  # trailer fields
        out += name + b":" + value + b"\r\n"
    return bytes(out + b"\r\n")


@dataclass
class Answer:
    """A well-formed answer, in the pieces the mutations work on."""

    method: str
    interims: bytes  # interim 1xx answers before the final one
    head: bytes  # the final head, status line to blank line
    payload: bytes  # the framed body (none for HEAD, 204, 304)
    closes: bool  # the upstream closes the connection after it
    tags: set[str]


def valid_answer(c: Choices) -> Answer:
    tags: set[str] = set()
    method = "HEAD" if c.chance(10) else "GET"
    if method == "HEAD":
        tags.add("head-request")
    version = b"1.0" if c.chance(15) else b"1.1"
    interims = bytearray()
    if version == b"1.1":
        for _ in range(c.pick([0, 0, 0, 1, 2])):
            interims += _head(version, c.pick([100, 102, 103]), _reason(c), _fields(c, 2))
    status = _status(c)
    head_fields = _fields(c, 4)
    connection = c.pick([None, None, b"close", b"keep-alive"])
    if connection is not None:
        head_fields.insert(c.number(0, len(head_fields)), (b"Connection", connection))
        if version == b"1.0" and connection == b"keep-alive":
            tags.add("http-1.0-keep-alive")
    body = c.binary(48) * c.pick([1, 1, 1, 2, 7, 40])  # up to 1920 bytes
    framing = c.pick(["length", "chunked", "close"])
    if version == b"1.0" and framing == "chunked":
        framing = "length"
    if status in (204, 304) and framing == "close":
        framing = "length"  # a 204 or 304 cannot end with the connection
    closes = framing == "close" or connection == b"close" or c.chance(30)
    if framing == "length":
        head_fields.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        head_fields.append((b"Transfer-Encoding", b"chunked"))
        payload = _chunked(c, body)
    else:
        payload = body
    if method == "HEAD" or status in (204, 304):
        payload = b""
    head = _head(version, status, _reason(c), head_fields)
    return Answer(method, bytes(interims), head, payload, closes, tags)


MUTATIONS = [
    "truncate",
    "tail",
    "forged-answer",
    "crlf-tail",
    "content-length-lies",
    "duplicate-content-length",
    "content-length-and-chunked",
    "bad-chunk-size",
    "status-outside",
    "status-101",
    "bare-lf",
    "obs-fold",
    "control-in-value",
    "control-in-reason",
]
CONTENT_LENGTH = b"\r\nContent-Length: "


def exchange(raw: bytes) -> Exchange:
    """An exchange from hypothesis' bytes: a valid answer, then (half the time) one mutation,
    then cut into up to five writes."""
    c = Choices(raw)
    mutation = c.pick(["none"] * len(MUTATIONS) + MUTATIONS)
    a = valid_answer(c)
    head, payload, tail, closes, tags = a.head, a.payload, b"", a.closes, a.tags
    line_end = head.index(b"\r\n")  # of the final status line
    if mutation == "tail":
        tail = c.binary(40) or b"\x00"
    elif mutation == "forged-answer":
        tail = b"HTTP/1.1 299 Forged\r\nSet-Cookie: s=x\r\nContent-Length: 6\r\n\r\nforged"
    elif mutation == "crlf-tail":
        tail = c.pick([b"\r\n", b"\r\n\r\n", b"\n"])
        tags.add("crlf-tail")
    elif mutation == "content-length-lies" and CONTENT_LENGTH in head:
        start = head.index(CONTENT_LENGTH) + len(CONTENT_LENGTH)
        end = head.index(b"\r\n", start)
        lie = max(0, int(head[start:end]) + c.pick([-3, -1, 1, 2, 50]))
        head = head[:start] + b"%d" % lie + head[end:]
    elif mutation == "duplicate-content-length" and CONTENT_LENGTH in head:
        start = head.index(CONTENT_LENGTH) + 2
        line = head[start : head.index(b"\r\n", start) + 2]
        head = head[:start] + line + head[start:]
        tags.add("duplicate-content-length")
    elif mutation == "content-length-and-chunked" and b"Transfer-Encoding: chunked" in head:
        both = b"Content-Length: 3\r\nTransfer-Encoding: chunked"
        head = head.replace(b"Transfer-Encoding: chunked", both)
        tags.add("content-length-and-chunked")
    elif mutation == "bad-chunk-size" and b"Transfer-Encoding: chunked" in head:
        bad = c.pick([b"zz", b"-1", b"1" + b"0" * 17, b" 5", b"5 5", b"0x5"])
        payload = bad + b"\r\n" + payload
    elif mutation == "status-outside":
        status = c.number(0, 99) if c.chance(50) else c.number(600, 999)
        if status >= 600:
            tags.add("status-600-999")
        head = head[:9] + b"%03d" % status + head[12:]
    elif mutation == "status-101":
        head = head[:9] + b"101" + head[12:]
    elif mutation == "bare-lf":
        head = head[:line_end] + b"\n" + head[line_end + 2 :]
        tags.add("bare-lf")
    elif mutation == "obs-fold":
        head = head[: line_end + 2] + b"X-Folded: a\r\n b\r\n" + head[line_end + 2 :]
        tags.add("obs-fold")
    elif mutation == "control-in-value":
        control = c.pick([b"\x00", b"\x01", b"\x1b", b"\x7f"])
        field = b"X-Control: a" + control + b"b\r\n"
        head = head[: line_end + 2] + field + head[line_end + 2 :]
        tags.add("control-in-value")
    elif mutation == "control-in-reason":
        if line_end > 12:  # there is a reason (h11 takes a control character in one)
            tags.add("control-in-reason")
        head = head[:line_end] + b"\x01" + head[line_end:]
    data = a.interims + head + payload + tail
    if mutation == "truncate" and len(data) > 1:
        data = data[: c.number(1, len(data) - 1)]
        closes = True
    cuts = sorted({c.number(1, max(1, len(data) - 1)) for _ in range(c.number(0, 4))})
    bounds = [0, *cuts, len(data)]
    parts = tuple(data[i:j] for i, j in itertools.pairwise(bounds) if j > i)
    return Exchange(a.method, parts, closes, frozenset(tags))


# 128 bytes of choices cover an exchange (see Choices); hypothesis draws fixed-size bytes far
# faster than variable-size ones.
exchanges = st.binary(min_size=128, max_size=128).map(exchange)


# --- the reference: h11 -------------------------------------------------------------------------


def through_h11(x: Exchange) -> tuple[Seen, bool]:
    """What h11 makes of the exchange, and whether it still waits for bytes at the end
    (then the upstream must close, or keygate would wait too)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=x.method, target="/", headers=[("Host", "upstream")]))
    conn.send(h11.EndOfMessage())
    for part in x.parts:
        conn.receive_data(part)
    if x.closes:
        conn.receive_data(b"")
    seen = Seen()
    body = bytearray()
    waiting = False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                waiting = True
                break
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Response):
                fields = tuple(event.headers.raw_items())
                seen.head = (event.status_code, bytes(event.reason), fields)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                seen.whole = True
                break
    except h11.RemoteProtocolError:
        pass
    seen.body = bytes(body)
    seen.keep_alive = conn.our_state is h11.DONE and conn.their_state is h11.DONE
    seen.left_over = conn.trailing_data[0]
    seen.reusable = seen.whole and seen.keep_alive and conn.trailing_data == (b"", False)
    return seen, waiting


# --- keygate's client against a real socket -----------------------------------------------------


@dataclass
class Round:
    """One exchange at the upstream: its parts, and what the upstream saw of the client."""

    exchange: Exchange
    written: asyncio.Event = field(default_factory=asyncio.Event)  # every part was written
    connections: int = 0
    closed_by_client: bool = False  # keygate closed the connection after the answer


@dataclass
class Upstream:
    """A loopback server writing the current round's parts, each on its own turn of the loop
    (so that the client reads each part on its own), then waiting to see whether keygate
    keeps the connection (pooled for reuse) or closes it."""

    round: Round | None = None
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = self.round
        assert current is not None
        current.connections += 1
        x = current.exchange
        try:
            await reader.readuntil(b"\r\n\r\n")
            for part in x.parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0)  # two turns: the client has read this part before
                await asyncio.sleep(0)  # the next one is written
            if x.closes:
                return
            current.written.set()
            await reader.read(1)  # returns (b"") once keygate closes; pending while pooled
            current.closed_by_client = True
        except (asyncio.IncompleteReadError, ConnectionError):
            current.closed_by_client = True
        finally:
            current.written.set()
            writer.close()


async def through_keygate(upstream: Upstream, x: Exchange) -> Seen:
    """keygate's reading of the exchange; ``reusable``: the connection stayed open (pooled)
    once the answer and everything after it had reached the client."""
    current = upstream.round = Round(x)
    pool = UpstreamPool(f"http://127.0.0.1:{upstream.port}", 1, connect_timeout=WITHIN)
    seen = Seen()
    body = bytearray()
    try:
        async with asyncio.timeout(WITHIN):
            try:
                async with pool.request(x.method, "/", []) as response:
                    seen.head = (
                        response.status,
                        response.reason.encode("latin-1"),
                        tuple(
                            (n.encode("latin-1"), v.encode("utf-8", "surrogateescape"))
                            for n, v in response.headers.items()
                        ),
                    )
                    try:
                        async for chunk in response.iter_any():
                            body += chunk
                        seen.whole = True
                    except UpstreamError:
                        pass
            except UpstreamError:
                pass
            seen.body = bytes(body)
            await current.written.wait()
            for _ in range(6):  # the last part reaches keygate, a close reaches the upstream
                await asyncio.sleep(0)
        seen.reusable = not x.closes and not current.closed_by_client
        assert current.connections == 1, "keygate opened a second connection for one request"
    finally:
        await pool.close()
    return seen


# --- the comparison ------------------------------------------------------------------------------


def compare(x: Exchange, ref: Seen, got: Seen) -> str | None:
    """Why keygate's reading differs from h11's, or None when it does not (or differs only
    where the exchange's tags say keygate does so on purpose)."""
    if ref.whole:
        if got.head is None or not got.whole:
            if x.tags & STRICTER:
                return None  # refused on purpose (STRICTER says why); never half-relayed
            return "keygate refused or cut an answer h11 read whole"
        if got.head != ref.head:
            return "the head differs"
        if got.body != ref.body:
            return "the body differs"
        if got.reusable != ref.reusable:
            if not got.reusable and x.tags & MAY_CLOSE:
                return None
            # Kept where h11 would close: only for the reasons MAY_REUSE names, nothing else.
            if (
                got.reusable
                and not x.closes
                and (ref.keep_alive or "http-1.0-keep-alive" in x.tags)
                and (not ref.left_over or "crlf-tail" in x.tags)
                and ref.left_over.strip(b"\r\n") == b""
            ):
                return None
            return f"reuse differs (keygate {got.reusable}, h11 {ref.reusable})"
        return None
    if got.whole:
        return "keygate took a broken answer for a whole one"
    if got.reusable:
        return "keygate kept the connection of a broken answer"
    if got.head is not None and ref.head is not None and got.head != ref.head:
        return "the head of a broken answer differs"
    if got.head is not None and ref.head is None:
        return "keygate gave a head h11 refused"
    if not (ref.body.startswith(got.body) or got.body.startswith(ref.body)):
        return "the partial bodies differ"
    return None


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture
def upstream_loop() -> Iterator[tuple[asyncio.AbstractEventLoop, Upstream]]:
    """uvloop, as keygate runs in production (gateway/runtime.py), with the upstream on it."""
    loop = uvloop.new_event_loop()
    upstream = Upstream()
    server = loop.run_until_complete(asyncio.start_server(upstream.handle, "127.0.0.1", 0))
    upstream.port = int(server.sockets[0].getsockname()[1])
    try:
        yield loop, upstream
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def test_keygate_reads_upstream_answers_as_h11_does(
    upstream_loop: tuple[asyncio.AbstractEventLoop, Upstream],
) -> None:
    loop, upstream = upstream_loop
    divergences: list[str] = []
    counted = {"exchanges": 0}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(exchanges)
    def check(x: Exchange) -> None:
        ref, waiting = through_h11(x)
        if waiting and not x.closes:  # h11 waits for more: so would keygate, for ever
            x = Exchange(x.method, x.parts, True, x.tags)
            ref, _ = through_h11(x)
        got = loop.run_until_complete(through_keygate(upstream, x))
        counted["exchanges"] += 1
        problem = compare(x, ref, got)
        if problem is not None:
            divergences.append(f"{problem}: {x!r}\n  h11:     {ref!r}\n  keygate: {got!r}")
        assert problem is None, divergences[-1]

    started = time.perf_counter()
    check()
    elapsed = time.perf_counter() - started
    print(
        f"\n{len(divergences)} divergences across {counted['exchanges']:,} exchanges "
        f"(h11 {version('h11')}) in {elapsed:.1f} s"
    )
