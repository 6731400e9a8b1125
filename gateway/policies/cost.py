"""What a response cost, measured while it streams past (a route's ``cost`` rule).

``meter_for(rule)`` gives one meter per request. The proxy calls ``see_headers`` once with
the upstream's status and headers, ``feed`` with each body chunk after the chunk was written
to the client (only needed while ``needs_body``), and ``result`` once at the end, also when
the body was cut short. A meter never holds a chunk back; it only looks at bytes the client
already has.

Money is integer micro-units (``MICRO``). Every conversion goes through ``Decimal`` and
rounds half up once, at the end: 3 tokens at 0.000002 credits are exactly 6 micro-units.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Callable, Mapping
from decimal import MAX_PREC, ROUND_HALF_UP, Context, Decimal

from gateway.config.model import CostRule
from gateway.policies.llm_usage import TokenUsage
from gateway.store.input import MAX_MONEY
from gateway.store.record import MICRO

MAX_JSON_BODY = 1 << 20  # bytes of a plain JSON body kept for parsing
MAX_EVENT = 1 << 20  # bytes of one server-sent event's data; a larger event is skipped
# A larger cost is a broken upstream, not a price; and the same bound as any amount in the
# store keeps micro-units exact in the Lua scripts' doubles.
MAX_CREDITS = MAX_MONEY
_MAX_MICRO = Decimal(MAX_CREDITS * MICRO)
_ONE = Decimal(1)
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# At most 1e9 credits with at most 6 decimals: a whole number of micro-units, no rounding.
_PLAIN = re.compile(r"[ \t]*(\d{1,9})(?:\.(\d{0,6}))?[ \t]*", re.ASCII)


class CostMeter:
    """Per-request cost state; ``result`` is None exactly when ``problem`` says why.

    ``usage``: the tokens the answer used, set by ``result`` on an LLM route (None on
    other routes, and when the answer told none).
    """

    __slots__ = ("_per_unit", "needs_body", "problem", "usage")

    def __init__(self, per_unit: Decimal) -> None:
        self._per_unit = per_unit
        self.needs_body = False  # may turn False mid-stream; feed stays safe to call
        self.problem: str | None = None
        self.usage: TokenUsage | None = None

    def see_headers(self, status: int, headers: Mapping[str, str]) -> None:
        """Note the upstream response head (headers case-insensitive, as aiohttp gives)."""

    def feed(self, chunk: bytes) -> None:
        """Look at the next body chunk, already sent to the client."""

    def result(self) -> int | None:
        """The cost in micro-units, or None (see ``problem``) when the response did not tell."""
        raise NotImplementedError

    def _settle(self, found: Decimal | str, what: str) -> int | None:
        """Micro-units for ``found`` credits per unit, or None after noting the problem."""
        micro = found if isinstance(found, str) else _micro(found, self._per_unit, what)
        if isinstance(micro, str):
            self.problem = micro
            return None
        return micro


class FixedMeter(CostMeter):
    """The same cost for every response; ``per_unit`` does not apply."""

    __slots__ = ("_credits",)

    def __init__(self, credits: float) -> None:
        super().__init__(_ONE)
        self._credits = credits

    def result(self) -> int | None:
        micro = _fixed_micro(self._credits)
        if isinstance(micro, str):
            self.problem = micro
            return None
        return micro


class HeaderMeter(CostMeter):
    """The cost is a response header holding a plain decimal number, times ``per_unit``."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, per_unit: Decimal) -> None:
        super().__init__(per_unit)
        self._name = name
        self._values: list[str] = []

    def see_headers(self, status: int, headers: Mapping[str, str]) -> None:
        # A repeated header must not pass unseen. (Duck-typed: an ABC isinstance check
        # costs about a microsecond per response.)
        getall = getattr(headers, "getall", None)
        if getall is not None:
            self._values = getall(self._name, [])
        else:
            value = headers.get(self._name)
            self._values = [] if value is None else [value]

    def result(self) -> int | None:
        values = self._values
        if len(values) == 1 and self._per_unit == 1:
            micro = _plain_micro(values[0])
            if micro is not None:
                return micro
        return self._settle(_header_number(self._name, values), self._name)


@functools.lru_cache(maxsize=1024)  # an upstream's prices repeat: parsed once each
def _plain_micro(text: str) -> int | None:
    """A plain amount of credits (the common case) in micro-units, exact in integers with
    no Decimal; None for anything else."""
    plain = _PLAIN.fullmatch(text)
    if plain is None:
        return None
    whole, fraction = plain.groups()
    return int(whole) * MICRO + int((fraction or "").ljust(6, "0"))


class JsonMeter(CostMeter):
    """The cost is a number at a dotted path of the JSON body, times ``per_unit``.

    A ``text/event-stream`` body is read event by event and the last event carrying a
    number there counts; any other body is parsed whole (up to ``MAX_JSON_BODY`` bytes) by
    ``result``. A gzip or deflate body is inflated on the way, never past the same bounds.
    """

    __slots__ = ("_body", "_dotted", "_events", "_found", "_inflate", "_keys", "_miss", "_size")

    def __init__(self, dotted: str, per_unit: Decimal) -> None:
        super().__init__(per_unit)
        self.needs_body = True
        self._dotted = dotted
        # Decoding is the costly part, and most stream events lack a key of the path (OpenAI
        # sends "usage": null in every chunk but the last): such events are skipped unread.
        self._keys = tuple(dict.fromkeys(f'"{k}"'.encode() for k in dotted.split(".")[::-1]))
        self._events: _EventStream | None = None
        self._inflate: zlib._Decompress | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._found: Decimal | None = None
        self._miss = f"no event carried {dotted}"

    def see_headers(self, status: int, headers: Mapping[str, str]) -> None:
        media = headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if media == "text/event-stream":
            self._events = _EventStream(self._event)
        coding = headers.get("Content-Encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header
        elif coding not in ("", "identity"):
            self._stop("the body's Content-Encoding is neither gzip nor deflate")

    def feed(self, chunk: bytes) -> None:
        if not self.needs_body:
            return
        if self._inflate is None:
            self._take(chunk)
            return
        try:
            while chunk and self.needs_body:  # bounded pieces: a small bomb stays small
                self._take(self._inflate.decompress(chunk, MAX_JSON_BODY))
                chunk = self._inflate.unconsumed_tail
        except zlib.error:
            self._stop("the compressed body is corrupt")

    def result(self) -> int | None:
        if self._inflate is not None and self.needs_body:
            try:
                self._take(self._inflate.flush())  # what zlib still held back
            except zlib.error:
                self._stop("the compressed body is corrupt")
        found: Decimal | str
        if self.problem is not None:
            return None
        if self._events is not None:
            skipped = self._events.skipped
            note = f" ({skipped} events over {MAX_EVENT} bytes skipped)" if skipped else ""
            found = self._miss + note if self._found is None else self._found
        elif not self._body:
            found = "the body is empty"
        else:
            try:
                found = _number_at(_loads(b"".join(self._body)), self._dotted)
            except (ValueError, ArithmeticError, RecursionError):
                found = "the body is not JSON"
        return self._settle(found, self._dotted)

    def _take(self, data: bytes) -> None:
        if self._events is not None:
            self._events.feed(data)
            return
        self._size += len(data)
        if self._size > MAX_JSON_BODY:
            self._stop(f"body larger than {MAX_JSON_BODY} bytes")
        elif data:
            self._body.append(data)

    def _event(self, data: bytearray) -> None:
        for key in self._keys:
            if key not in data:
                return
        try:
            found = _number_at(_loads(data), self._dotted)
        except (ValueError, ArithmeticError, RecursionError):
            return  # not JSON, such as OpenAI's closing "[DONE]"
        if isinstance(found, str):
            self._miss = f"no event carried a number at {self._dotted} (last: {found})"
        else:
            self._found = found

    def _stop(self, problem: str) -> None:
        self.problem = problem
        self.needs_body = False
        self._body.clear()


class _EventStream:
    """Server-sent events (HTML "event stream interpretation") read from slices cut
    anywhere: ``on_data`` gets the data of each complete event (a buffer valid only during
    the call); other fields are ignored.

    Memory stays under about ``MAX_EVENT`` bytes: an event whose data grows past it, or a
    line longer than it, is dropped as it arrives (dropped events count in ``skipped``).
    """

    __slots__ = ("_after_cr", "_data", "_discarding", "_line", "_on_data", "_skip", "skipped")

    def __init__(self, on_data: Callable[[bytearray], None]) -> None:
        self._on_data = on_data
        self._data = bytearray()  # data lines of the current event, each ending in \n
        self._line = bytearray()  # a line whose end has not arrived yet
        self._after_cr = False  # the last slice ended in \r, so a \n opening the next ends nothing
        self._discarding = False  # the rest of an overlong line is dropped
        self._skip = False  # the current event grew past MAX_EVENT
        self.skipped = 0

    def feed(self, chunk: bytes) -> None:
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
            self._after_cr = False
        if not chunk:
            return
        self._after_cr = chunk[-1] == 13
        lines = chunk.splitlines(keepends=True)  # bytes split on \n, \r\n and \r only
        partial = b"" if lines[-1][-1] in b"\r\n" else lines.pop()
        if lines and self._discarding:
            self._discarding = False
            del lines[0]
        elif lines and self._line:
            self._line += lines[0]
            lines[0] = bytes(self._line)
            self._line.clear()
        for line in lines:
            self._take_line(line.rstrip(b"\r\n"))
        if partial and not self._discarding:
            self._line += partial
            if len(self._line) + len(self._data) > MAX_EVENT + 6:  # room for "data: "
                if self._line.startswith(b"data"):
                    self._drop_event()
                self._line.clear()
                self._discarding = True

    def _take_line(self, line: bytes) -> None:
        if not line:
            if self._data:
                del self._data[-1]  # the \n after the last data line
                self._on_data(self._data)
                self._data.clear()
            self._skip = False
            return
        name, _, value = line.partition(b":")
        if name != b"data" or self._skip:
            return  # comments (":"), event, id and retry do not change a cost
        value = value.removeprefix(b" ")
        if len(self._data) + len(value) > MAX_EVENT:
            self._drop_event()
            return
        self._data += value
        self._data += b"\n"

    def _drop_event(self) -> None:
        self._data.clear()
        self._skip = True
        self.skipped += 1


def meter_for(rule: CostRule) -> CostMeter:
    """A fresh meter for one response under ``rule`` (exactly one of fixed, header, json)."""
    return meter_factory(rule)()


def meter_factory(rule: CostRule) -> Callable[[], CostMeter]:
    """What makes a fresh meter under ``rule``; built once per route, called per response."""
    if rule.fixed is not None:
        return functools.partial(FixedMeter, rule.fixed)
    if rule.header is not None:
        return functools.partial(HeaderMeter, rule.header, _decimal(rule.per_unit))
    if rule.json is not None:
        return functools.partial(JsonMeter, rule.json, _decimal(rule.per_unit))
    raise ValueError("a cost rule sets one of fixed, header or json")


@functools.lru_cache(maxsize=256)
def _fixed_micro(credits: float) -> int | str:
    return _micro(_decimal(credits), _ONE, "fixed cost")


@functools.lru_cache(maxsize=256)  # a route's numbers: converted once, not per request
def _decimal(number: float) -> Decimal:
    # The shortest repr is what the config spelled; Decimal(0.1) would keep binary noise.
    return Decimal(repr(number))


def _header_number(name: str, values: list[str]) -> Decimal | str:
    """The one decimal number in a header's values, or what is wrong with them."""
    if not values:
        return f"no {name} header"
    text = values[0].strip(" \t")
    if any(other.strip(" \t") != text for other in values[1:]):
        return f"{name} given more than once with different values"
    if not _NUMBER.fullmatch(text):
        return f"{name} {_clip(text)!r} is not a decimal number"
    return Decimal(text)


def _micro(credits: Decimal, per_unit: Decimal, what: str) -> int | str:
    """``credits * per_unit`` in micro-units, rounded half up; or why it is no cost."""
    if not credits.is_finite():
        return f"{what} is not a finite number"
    if credits < 0:
        return f"{what} is negative"
    if not credits or not per_unit:
        return 0
    if credits.adjusted() + per_unit.adjusted() >= 13:  # surely above MAX_CREDITS
        return f"{what} is too large"
    # At the largest precision a product is exact: libmpdec sizes it to the operands.
    context = Context(prec=MAX_PREC)
    micro = context.multiply(context.multiply(credits, per_unit), MICRO)
    if micro > _MAX_MICRO:
        return f"{what} is too large"
    return int(micro.to_integral_value(rounding=ROUND_HALF_UP))


def _loads(data: bytes | bytearray) -> object:
    """The JSON document in ``data`` with every number (NaN too) as a Decimal."""
    return json.loads(data, parse_float=Decimal, parse_int=Decimal, parse_constant=Decimal)


def _number_at(document: object, dotted: str) -> Decimal | str:
    """The number at the dotted path in ``document``, or what was found instead."""
    value = document
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return f"no {dotted} in the JSON"
        value = value[key]
    if isinstance(value, Decimal):
        return value
    kind = {type(None): "null", bool: "a boolean", str: "a string", list: "an array"}
    return f"{dotted} is {kind.get(type(value), 'an object')}, not a number"


def _clip(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
