"""An LLM request's body read before forwarding, and the usage a stream carries only when
asked for, asked for and hidden again.

``read_request`` parses the body once and returns what the reservation and the meter need
(``LlmRequest``), or a client error naming the field.

Streams carry usage (README, "LLM APIs"): an OpenAI Chat Completions or Completions stream
sends its usage only when the request sets ``stream_options.include_usage``. For a stream
that did not (``stream and not usage_requested``) the proxy forwards
``with_usage_requested(body)`` instead of the body, feeds the meter the upstream's bytes as
they arrive (the meter must see the usage event), and writes to the client what a
``UsageEventFilter`` fed the same bytes returns, so the client gets exactly the stream it
asked for. Neither is for other APIs: the Responses API (``/v1/responses``) always sends
its usage in ``response.completed``, Anthropic's Messages stream in ``message_start`` and
``message_delta``, and both would refuse an unknown ``stream_options.include_usage``.

JSON is read member by member with the standard library's scanner, so a rewrite splices the
body's bytes (numbers, spacing and member order stay the client's) and the filter removes a
member without re-serialising the provider's JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NoReturn, TypeGuard

from gateway.config.model import LlmApi
from gateway.policies.llm_usage import LlmRequest

# The most of a stream event held while it is incomplete; the rest of a larger one is passed
# on unfiltered as it arrives, so a filter never holds more than this (plus one chunk).
MAX_HELD_EVENT_BYTES = 1_048_576

# The output bounds each API's requests may set (the smallest wins), and the members that ask
# for several answers to one request, each up to the bound (Completions' best_of are
# generated and billed, n of them returned).
_OUTPUT_BOUNDS: dict[LlmApi, tuple[str, ...]] = {
    "openai": ("max_tokens", "max_completion_tokens", "max_output_tokens"),
    "anthropic": ("max_tokens",),
}
_ANSWER_COUNTS: dict[LlmApi, tuple[str, ...]] = {"openai": ("n", "best_of"), "anthropic": ()}
_READ_MEMBERS: dict[LlmApi, frozenset[str]] = {
    "openai": frozenset(
        {"model", "stream", "stream_options", *_OUTPUT_BOUNDS["openai"], *_ANSWER_COUNTS["openai"]}
    ),
    "anthropic": frozenset({"model", "stream", *_OUTPUT_BOUNDS["anthropic"]}),
}


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # Python's json would read NaN and Infinity


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip_whitespace(text: str, pos: int) -> int:
    found = _WHITESPACE.match(text, pos)
    assert found is not None  # the pattern matches the empty string
    return found.end()


class _NotAnObject(ValueError):
    """Valid JSON, or not, that does not start with an object."""


@dataclass(frozen=True, slots=True)
class _Member:
    """One member of a JSON object, with where it lies in the text (character offsets)."""

    name: str
    value: object
    start: int  # the opening quote of its name
    value_start: int
    end: int  # just past its value


def _object_members(text: str, pos: int) -> tuple[list[_Member], int]:
    """The members of the JSON object starting at ``text[pos]``, in order, and the offset
    just past it. Raises ValueError if there is no well-formed object there."""
    if not text.startswith("{", pos):
        raise _NotAnObject("not an object")
    members: list[_Member] = []
    pos = _skip_whitespace(text, pos + 1)
    if text.startswith("}", pos):
        return members, pos + 1
    while True:
        if not text.startswith('"', pos):
            raise ValueError("member name expected")
        name, after_name = _DECODER.raw_decode(text, pos)
        colon = _skip_whitespace(text, after_name)
        if not text.startswith(":", colon):
            raise ValueError("':' expected")
        value_start = _skip_whitespace(text, colon + 1)
        value, end = _DECODER.raw_decode(text, value_start)
        members.append(_Member(name, value, pos, value_start, end))
        pos = _skip_whitespace(text, end)
        if text.startswith(",", pos):
            pos = _skip_whitespace(text, pos + 1)
        elif text.startswith("}", pos):
            return members, pos + 1
        else:
            raise ValueError("',' or '}' expected")


def _document_members(text: str) -> list[_Member]:
    """The members of the JSON document ``text``, which must be one object. Raises
    _NotAnObject if it is not an object, ValueError if it is not JSON."""
    members, end = _object_members(text, _skip_whitespace(text, 0))
    if _skip_whitespace(text, end) != len(text):
        raise ValueError("data after the object")
    return members


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _output_bound(api: LlmApi, fields: dict[str, object]) -> int | str | None:
    """The most output tokens the request's answers may use (None: it sets no bound), or
    the error naming a bad member."""
    counts: dict[str, int] = {}
    for name in (*_OUTPUT_BOUNDS[api], *_ANSWER_COUNTS[api]):
        value = fields.get(name)
        if value is None:
            continue
        if not _positive_int(value):
            return f"{name}: must be a positive integer"
        counts[name] = value
    bounds = [counts[name] for name in _OUTPUT_BOUNDS[api] if name in counts]
    answers = max((counts[name] for name in _ANSWER_COUNTS[api] if name in counts), default=1)
    return min(bounds) * answers if bounds else None


def read_request(api: LlmApi, body: bytes) -> LlmRequest | str:
    """What an LLM request's JSON body asks for, or a client error naming the field.

    ``null`` reads as absent (as the APIs take it). ``max_output_tokens`` is the smallest of
    the bounds the API knows (OpenAI: ``max_tokens``, ``max_completion_tokens``,
    ``max_output_tokens``; Anthropic: ``max_tokens``), times the answers asked for (OpenAI's
    ``n`` and Completions' ``best_of``), None when none is set. ``usage_requested``: an OpenAI
    request that set ``stream_options.include_usage`` true. A body without a model reads
    with model None (the route decides); an embeddings request has no ``stream``: False.
    A member this reads, given twice, is refused: upstreams disagree on which one counts.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "body: not UTF-8"
    try:
        members = _document_members(text)
    except _NotAnObject:
        try:
            _DECODER.decode(text)
        except ValueError:
            return "body: not JSON"
        return "body: must be a JSON object"
    except ValueError:
        return "body: not JSON"
    fields: dict[str, object] = {}
    read = _READ_MEMBERS[api]
    for member in members:
        if member.name in read and member.name in fields:
            return f"{member.name}: given more than once"
        fields[member.name] = member.value

    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        return "model: must be a string"
    if model == "":
        return "model: must not be empty"
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return "stream: must be true or false"

    max_output_tokens = _output_bound(api, fields)
    if isinstance(max_output_tokens, str):
        return max_output_tokens
    usage_requested = False
    if api == "openai":
        options = fields.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                return "stream_options: must be an object"
            include_usage = options.get("include_usage")
            if include_usage is not None and not isinstance(include_usage, bool):
                return "stream_options.include_usage: must be true or false"
            usage_requested = include_usage is True
    return LlmRequest(
        model=model,
        stream=stream is True,
        max_output_tokens=max_output_tokens,
        body_bytes=len(body),
        usage_requested=usage_requested,
    )


def with_usage_requested(body: bytes) -> bytes | None:
    """The body to send upstream instead of an OpenAI Chat Completions or Completions
    streaming request's, so that its stream ends with a usage event: ``stream_options``
    with ``include_usage`` true, spliced into the client's bytes (its other options, member
    order, numbers and spacing unchanged). None when nothing needs changing: not a stream,
    usage already asked for, or a body ``read_request`` refuses.

    Only for those two APIs: the Responses API and Anthropic's Messages send usage anyway
    and refuse the member (module docstring).
    """
    try:
        text = body.decode("utf-8")
        members = _document_members(text)
    except ValueError:
        return None
    names = [member.name for member in members]
    if names.count("stream") > 1 or names.count("stream_options") > 1:
        return None  # read_request refuses it
    by_name = {member.name: member for member in members}
    stream = by_name.get("stream")
    if stream is None or stream.value is not True:
        return None
    # (start, end, replacement) in the text, in order, none overlapping.
    splices: list[tuple[int, int, str]]
    options = by_name.get("stream_options")
    if options is None:
        splices = [(stream.end, stream.end, ',"stream_options":{"include_usage":true}')]
    elif options.value is None:
        splices = [(options.value_start, options.end, '{"include_usage":true}')]
    elif isinstance(options.value, dict):
        inner, _ = _object_members(text, options.value_start)
        flags = [member for member in inner if member.name == "include_usage"]
        if flags and all(flag.value is True for flag in flags):
            return None
        if flags:  # every copy: upstreams disagree on which one counts
            splices = [(flag.value_start, flag.end, "true") for flag in flags]
        elif inner:
            splices = [(inner[-1].end, inner[-1].end, ',"include_usage":true')]
        else:
            splices = [(options.value_start + 1, options.value_start + 1, '"include_usage":true')]
    else:
        return None
    pieces: list[str] = []
    done = 0
    for start, end, replacement in splices:
        pieces += (text[done:start], replacement)
        done = end
    pieces.append(text[done:])
    return "".join(pieces).encode("utf-8")


# SSE line ends: CRLF, LF or CR. A CR at the end of the bytes seen so far ends its line; an LF
# arriving next belongs to it.
_LINE_END = rb"(?:\r\n|\r(?!\n)|\n)"
# An event's end: the end of a line, then an empty line's.
_EVENT_END = re.compile(_LINE_END + _LINE_END)
_LINE_END_RE = re.compile(_LINE_END)
_LINE_TEXT = re.compile(rb"[^\r\n]+")
_NULL_USAGE_LAST = b',"usage":null}'
_CR = 13
_LF = 10
_COLON = 58


def _data_spans(event: bytes) -> list[tuple[int, int]]:
    """Where the value of each of an event's ``data`` lines lies in its bytes."""
    spans: list[tuple[int, int]] = []
    for line in _LINE_TEXT.finditer(event):
        start, end = line.span()
        if event.startswith(b"data:", start):
            value = start + 5
            if event.startswith(b" ", value):
                value += 1
            spans.append((value, end))
        elif end - start == 4 and event.startswith(b"data", start):
            spans.append((end, end))
    return spans


def _filtered(event: bytes) -> bytes:
    """The event as the client gets it: b"" for the usage-only event (``"choices": []``
    with a usage), without the top-level ``"usage": null`` member otherwise, else as is."""
    if b'"usage"' not in event:  # most events: no JSON read at all
        return event
    spans = _data_spans(event)
    if not spans:
        return event
    if len(spans) == 1:
        data = event[spans[0][0] : spans[0][1]]
    else:
        data = b"\n".join(event[start:end] for start, end in spans)
    try:
        document = _DECODER.decode(data.decode("utf-8"))
    except ValueError:
        return event
    if not isinstance(document, dict) or "usage" not in document:
        return event
    if document["usage"] is not None:
        return b"" if document.get("choices") == [] else event
    if len(spans) > 1:  # a member cut over lines: left as sent, the client ignores it
        return event
    start, end = spans[0]
    if data.endswith(_NULL_USAGE_LAST):
        # OpenAI's spelling, on every chunk: the member just before the closing brace of a
        # valid object is a top-level one, no need to read the object's members.
        return event[: end - len(_NULL_USAGE_LAST)] + event[end - 1 :]
    return _without_null_usage(event, start, data.decode("utf-8"))


def _without_null_usage(event: bytes, value_start: int, text: str) -> bytes:
    """The event without the top-level ``"usage": null`` member of its JSON data ``text``
    (which starts at ``value_start``), cut with one comma next to it and the whitespace
    between."""
    members = _document_members(text)
    at = {member.name: index for index, member in enumerate(members)}["usage"]
    usage = members[at]
    if at > 0:
        cut = (members[at - 1].end, usage.end)
    elif len(members) > 1:
        cut = (usage.start, members[1].start)
    else:
        cut = (usage.start, usage.end)
    if not text.isascii():  # character offsets to byte offsets
        cut = (len(text[: cut[0]].encode()), len(text[: cut[1]].encode()))
    return event[: value_start + cut[0]] + event[value_start + cut[1] :]


class UsageEventFilter:
    """Removes from an OpenAI stream the usage a client did not ask for (keygate asked for
    it upstream: ``with_usage_requested``): the usage-only event (``"choices": []`` with a
    usage), whole with all its lines, and the ``"usage": null`` member of every other
    event, cut from the provider's bytes. Everything else passes byte for byte.

    ``feed(chunk)`` returns what to write to the client now, ``flush()`` at the end of the
    body what is still held. Chunks may be cut anywhere. Every event is written in the
    ``feed`` call that completes it; only an event's incomplete tail is held, and not past
    ``MAX_HELD_EVENT_BYTES``: an event still incomplete beyond that is written as it
    arrives, unfiltered. Comment lines (keep-alives) and empty lines between events are
    written at once.

    The meter reads the upstream's bytes, not these: it needs the usage event.
    """

    def __init__(self) -> None:
        self._held = bytearray()  # the current event's bytes, not complete yet
        self._searched = 0  # of them, searched for the event's end (up to 3 bytes before)
        self._lf_pending = False  # the last bytes written ended in CR: an LF next is theirs
        self._drop_lf = False  # ... and they were removed, so it goes too
        self._passing = False  # an event over the cap is being written as it arrives
        self._tail = b""  # its last 3 bytes, to see its end in the next chunk

    def feed(self, chunk: bytes) -> bytes:
        """What to write to the client now that ``chunk`` arrived (possibly b"")."""
        if not chunk:
            return b""
        out = bytearray()
        pos = 0
        if self._lf_pending:
            self._lf_pending = False
            if chunk[0] == _LF:
                pos = 1
                if not self._drop_lf:
                    out.append(_LF)
        if self._passing:
            pos = self._pass_on(chunk, pos, out)
        if pos < len(chunk):
            self._held += chunk[pos:] if pos else chunk
            self._write_complete(out)
        return bytes(out)

    def flush(self) -> bytes:
        """At the end of the body: the held tail of an event that never ended, filtered."""
        held = bytes(self._held)
        self._held.clear()
        self._searched = 0
        self._lf_pending = self._drop_lf = self._passing = False
        self._tail = b""
        return _filtered(held) if held else b""

    def _pass_on(self, chunk: bytes, pos: int, out: bytearray) -> int:
        """Writes the oversized event's bytes in ``chunk`` from ``pos``; returns where the
        next event starts (``len(chunk)`` if this one goes on)."""
        window = self._tail + chunk[pos:]
        end = _EVENT_END.search(window)
        if end is None:
            out += chunk[pos:]
            self._tail = window[-3:]
            return len(chunk)
        stop = max(pos, pos + end.end() - len(self._tail))
        out += chunk[pos:stop]
        self._passing = False
        self._tail = b""
        self._note_written_end(chunk, stop, removed=False)
        return stop

    def _write_complete(self, out: bytearray) -> None:
        """Writes (filtered) every complete event and passable line held; holds the rest."""
        held = self._held
        start = 0
        while start < len(held):
            # At an event's start, an empty line or a comment line goes on at once: a
            # server's keep-alive must not wait for the event after it.
            line = None
            if held[start] in (_CR, _LF):
                line = _LINE_END_RE.match(held, start)
            elif held[start] == _COLON:  # its end, searched once: a long comment may drip
                line = _LINE_END_RE.search(held, max(start, self._searched))
            if line is not None:
                out += held[start : line.end()]
                start = line.end()
                self._note_written_end(held, start, removed=False)
                continue
            end = _EVENT_END.search(held, max(start, self._searched))
            if end is None:
                break
            kept = _filtered(bytes(held[start : end.end()]))
            out += kept
            start = end.end()
            self._note_written_end(held, start, removed=not kept)
        del held[:start]
        self._searched = max(0, len(held) - 3)
        if len(held) > MAX_HELD_EVENT_BYTES:
            out += held
            self._tail = bytes(held[-3:])
            self._passing = True
            held.clear()
            self._searched = 0

    def _note_written_end(self, data: bytes | bytearray, end: int, *, removed: bool) -> None:
        """Bytes written or removed up to ``end`` of ``data``: if they end the data in CR,
        an LF opening the next chunk belongs to them."""
        if end == len(data) and data[end - 1] == _CR:
            self._lf_pending = True
            self._drop_lf = removed
