"""UsageEventFilter: a client that streamed without asking for usage gets exactly the
OpenAI stream it asked for, whatever the chunking, with every event written as soon as it
is complete."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from openai.types.chat import ChatCompletionChunk
from openai.types.completion import Completion

from gateway.policies.llm_request import MAX_HELD_EVENT_BYTES, UsageEventFilter

_HEAD = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini"'
_DELTAS = [
    '{"role":"assistant","content":"","refusal":null}',
    '{"content":"Hi"}',
    '{"content":"! Ça va"}',  # raw UTF-8, as OpenAI sends it
    '{"content":" très bien 🙂"}',
]
_USAGE = (
    '{"prompt_tokens":13,"completion_tokens":7,"total_tokens":20,'
    '"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}'
)


def _chunk(choices: str, usage: str) -> str:
    return f'data: {{{_HEAD},"system_fingerprint":"fp_1","choices":[{choices}]{usage}}}\n\n'


def _choice(delta: str, finish: str = "null") -> str:
    return f'{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}'


def _stream(*, with_usage: bool) -> list[str]:
    """The events of one answer as OpenAI streams it, with or without include_usage."""
    null = ',"usage":null' if with_usage else ""
    events = [_chunk(_choice(delta), null) for delta in _DELTAS]
    events.append(_chunk(_choice("{}", '"stop"'), null))
    if with_usage:
        events.append(f'data: {{{_HEAD},"system_fingerprint":"fp_1","choices":[],'
                      f'"usage":{_USAGE}}}\n\n')  # fmt: skip
    events.append("data: [DONE]\n\n")
    return events


def _wire(events: list[str], line_end: str = "\n") -> bytes:
    return "".join(events).replace("\n", line_end).encode()


UPSTREAM = _stream(with_usage=True)  # what keygate's rewritten request gets
CLIENT = _stream(with_usage=False)  # what the client asked for
LINE_ENDS = ["\n", "\r\n", "\r"]


def _run(filter_: UsageEventFilter, pieces: list[bytes]) -> list[bytes]:
    outs = [filter_.feed(piece) for piece in pieces]
    outs.append(filter_.flush())
    return outs


def _owed(events: list[str], kept: list[str], line_end: str, received: int) -> int:
    """How many bytes of the client's stream must have been written once ``received``
    bytes of the upstream's arrived: every event complete by then (a CRLF-ended event is
    complete at its last CR; its LF is written when it comes)."""
    upstream_end = 0
    owed = 0
    by_event = dict(zip(events, kept, strict=False))
    for event in events:
        wire = event.replace("\n", line_end).encode()
        upstream_end += len(wire)
        complete_at = upstream_end - 1 if line_end == "\r\n" else upstream_end
        out = by_event.get(event, "").replace("\n", line_end).encode()
        if received >= upstream_end:
            owed += len(out)
        elif received == complete_at:
            owed += len(out) - 1 if out else 0
    return owed


def _check_split(cuts: list[int], line_end: str) -> None:
    upstream = _wire(UPSTREAM, line_end)
    expected = _wire(CLIENT, line_end)
    edges = [0, *sorted(cuts), len(upstream)]
    pieces = [upstream[a:b] for a, b in itertools.pairwise(edges)]
    filter_ = UsageEventFilter()
    written = b""
    kept = _kept_pairs()
    for piece, received in zip(pieces, edges[1:], strict=False):
        written += filter_.feed(piece)
        owed = _owed(UPSTREAM, kept, line_end, received)
        assert expected.startswith(written), (cuts, written)
        assert len(written) >= owed, (cuts, received, written)  # nothing complete held back
    written += filter_.flush()
    assert written == expected


def _kept_pairs() -> list[str]:
    """For each upstream event, what the client gets of it ("" for the usage event)."""
    return [*CLIENT[:-1], "", CLIENT[-1]]


def test_the_client_gets_the_stream_it_asked_for() -> None:
    out = _run(UsageEventFilter(), [_wire(UPSTREAM)])
    assert b"".join(out) == _wire(CLIENT)
    assert out[-1] == b""  # nothing held at the end


@pytest.mark.parametrize("line_end", LINE_ENDS, ids=["lf", "crlf", "cr"])
def test_every_cut_point(line_end: str) -> None:
    for cut in range(len(_wire(UPSTREAM, line_end)) + 1):
        _check_split([cut], line_end)


@pytest.mark.parametrize("line_end", LINE_ENDS, ids=["lf", "crlf", "cr"])
def test_one_byte_at_a_time(line_end: str) -> None:
    _check_split(list(range(len(_wire(UPSTREAM, line_end)))), line_end)


@settings(max_examples=300, deadline=None)
@given(
    cuts=st.lists(st.integers(0, len(_wire(UPSTREAM, "\r\n"))), max_size=40),
    line_end=st.sampled_from(LINE_ENDS),
)
def test_random_cuts(cuts: list[int], line_end: str) -> None:
    _check_split([min(cut, len(_wire(UPSTREAM, line_end))) for cut in cuts], line_end)


def _sdk_events(pieces: list[bytes]) -> Iterator[str]:
    for event in SSEDecoder().iter_bytes(iter(pieces)):
        yield event.data


@pytest.mark.parametrize("line_end", LINE_ENDS, ids=["lf", "crlf", "cr"])
def test_the_openai_sdk_reads_the_filtered_stream(line_end: str) -> None:
    upstream = _wire(UPSTREAM, line_end)
    filtered = _run(UsageEventFilter(), [upstream[i : i + 7] for i in range(0, len(upstream), 7)])
    data = list(_sdk_events(filtered))
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(text) for text in data[:-1]]
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk
    assert all("usage" not in json.loads(text) for text in data[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi! Ça va très bien 🙂"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # ... and reads, from the unfiltered stream, the usage the meter reads.
    upstream_data = list(_sdk_events([upstream]))
    last = ChatCompletionChunk.model_validate_json(upstream_data[-2])
    assert last.usage is not None and last.usage.total_tokens == 20


def test_the_usage_event_goes_whole_with_its_event_and_id_lines() -> None:
    usage = f'id: 7\nevent: chunk\ndata: {{"choices":[],"usage":{_USAGE}}}\nretry: 10\n\n'
    stream = (f'id: 6\ndata: {{"choices":[{_choice("{}")}],"usage":null}}\n\n'
              f"{usage}data: [DONE]\n\n").encode()  # fmt: skip
    out = b"".join(_run(UsageEventFilter(), [stream]))
    assert out == f'id: 6\ndata: {{"choices":[{_choice("{}")}]}}\n\ndata: [DONE]\n\n'.encode()


def test_a_usage_event_over_several_data_lines_goes_whole() -> None:
    stream = b'data: {"choices":[],\ndata: "usage":{"total_tokens":3}}\n\ndata: [DONE]\n\n'
    assert b"".join(_run(UsageEventFilter(), [stream])) == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        ('{"id":"c","choices":[],"usage":null}', '{"id":"c","choices":[]}'),
        ('{"usage":null,"id":"c"}', '{"id":"c"}'),
        ('{"id":"c","usage": null}', '{"id":"c"}'),
        ('{"usage": null, "id": "c"}', '{"id": "c"}'),
        ('{"id": "c", "usage": null}', '{"id": "c"}'),  # Python's json.dumps
        # The member and the comma before it go; spacing elsewhere stays the provider's.
        ('{"id":"c",\t"usage" : null ,"x":1}', '{"id":"c" ,"x":1}'),
        ('{"usage":null}', "{}"),
        ('{"id":"\\"usage\\":null","usage":null}', '{"id":"\\"usage\\":null"}'),
        ('{"id":"é","usage":null,"x":"字"}', '{"id":"é","x":"字"}'),
    ],
)
def test_usage_null_is_cut_from_the_providers_bytes(sent: str, received: str) -> None:
    stream = f"data: {sent}\n\n".encode()
    assert b"".join(_run(UsageEventFilter(), [stream])) == f"data: {received}\n\n".encode()


@pytest.mark.parametrize(
    "event",
    [
        "data: [DONE]\n\n",
        ": OPENROUTER PROCESSING\n\n",
        "event: ping\ndata: {}\n\n",
        "retry: 3000\n\n",
        'data: not json, "usage":null\n\n',
        # Nested, not the chunk's own usage: left alone.
        'data: {"choices":[{"delta":{"usage":null}}]}\n\n',
        # A chunk with content and a usage (some providers send the usage there): kept.
        f'data: {{"choices":[{_choice("{}")}],"usage":{_USAGE}}}\n\n',
        # An error event.
        'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n',
        "\n",  # an empty line on its own
    ],
)
def test_other_events_pass_byte_for_byte(event: str) -> None:
    filter_ = UsageEventFilter()
    assert filter_.feed(event.encode()) == event.encode()
    assert filter_.flush() == b""


def test_a_keep_alive_comment_is_not_held_for_the_event_after_it() -> None:
    filter_ = UsageEventFilter()
    assert filter_.feed(b": keep-alive\ndata: {") == b": keep-alive\n"
    assert filter_.feed(b'"usage":null}\n\n') == b"data: {}\n\n"


def test_a_dripping_comment_is_written_when_its_line_ends() -> None:
    filter_ = UsageEventFilter()
    comment = b": " + b"k" * 5000
    assert b"".join(filter_.feed(comment[i : i + 1]) for i in range(len(comment))) == b""
    assert filter_.feed(b"\r") == comment + b"\r"
    assert filter_.feed(b"\n\r\ndata: [DONE]\r\n\r\n") == b"\n\r\ndata: [DONE]\r\n\r\n"


def test_an_lf_after_a_removed_events_cr_goes_with_it() -> None:
    filter_ = UsageEventFilter()
    usage = f'data: {{"choices":[],"usage":{_USAGE}}}\r\n\r'.encode()
    assert filter_.feed(usage) == b""
    assert filter_.feed(b"\ndata: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"


def test_flush_writes_an_events_unended_tail_filtered() -> None:
    filter_ = UsageEventFilter()
    assert filter_.feed(b'data: {"id":"c","usage":null}') == b""
    assert filter_.flush() == b'data: {"id":"c"}'
    assert filter_.feed(b'data: {"choices":[],"usage":{"total_tokens":1}}\n') == b""
    assert filter_.flush() == b""  # a usage event missing its empty line is still removed
    assert filter_.feed(b'data: {"id":"c","choi') == b""
    assert filter_.flush() == b'data: {"id":"c","choi'  # a stream cut short: as it came


def test_an_event_over_the_cap_is_written_as_it_arrives_unfiltered() -> None:
    piece = 64 * 1024
    content = "x" * (2 * MAX_HELD_EVENT_BYTES)
    big = f'data: {{"choices":[{_choice(json.dumps({"content": content}))}],"usage":null}}\n\n'
    stream = big.encode() + _wire(UPSTREAM)
    filter_ = UsageEventFilter()
    written = b""
    for start in range(0, len(stream), piece):
        out = filter_.feed(stream[start : start + piece])
        if start > MAX_HELD_EVENT_BYTES + piece and start + piece < len(big):
            assert out == stream[start : start + piece]  # nothing held any more
        written += out
    written += filter_.flush()
    assert written == big.encode() + _wire(CLIENT)  # the streams after it filtered again


@pytest.mark.parametrize("line_end", LINE_ENDS, ids=["lf", "crlf", "cr"])
def test_filtering_resumes_after_an_event_over_the_cap(line_end: str) -> None:
    big = f'data: {{"choices":[],"usage":null,"pad":"{"x" * 2 * MAX_HELD_EVENT_BYTES}"}}\n\n'
    big_wire = big.replace("\n", line_end).encode()
    filter_ = UsageEventFilter()
    head = big_wire[:-1]  # its end cut between CR and LF, for CRLF
    written = b"".join(filter_.feed(head[i : i + 60000]) for i in range(0, len(head), 60000))
    assert written == head  # unfiltered: held past the cap
    written += filter_.feed(big_wire[-1:] + _wire(UPSTREAM, line_end)) + filter_.flush()
    assert written == big_wire + _wire(CLIENT, line_end)


def test_a_usage_event_over_the_cap_reaches_the_client() -> None:
    # The cap holds memory to 1 MiB; such an event is not OpenAI's, and the client sees it.
    usage = f'data: {{"choices":[],"pad":"{"x" * 2 * MAX_HELD_EVENT_BYTES}","usage":{{}}}}\n\n'
    stream = usage.encode() + b"data: [DONE]\n\n"
    filter_ = UsageEventFilter()
    assert (
        b"".join(filter_.feed(stream[i : i + 4096]) for i in range(0, len(stream), 4096))
        + (filter_.flush())
        == stream
    )


def test_completions_streams_are_filtered_too() -> None:
    head = '"id":"cmpl-1","object":"text_completion","created":1,"model":"gpt-3.5-turbo-instruct"'
    choice = '{"text":"Hi","index":0,"logprobs":null,"finish_reason":"stop"}'
    text = f'data: {{{head},"choices":[{choice}]'
    stream = (f'{text},"usage":null}}\n\n'
              f'data: {{{head},"choices":[],"usage":{{"prompt_tokens":2,"completion_tokens":1,'
              f'"total_tokens":3}}}}\n\ndata: [DONE]\n\n').encode()  # fmt: skip
    out = b"".join(_run(UsageEventFilter(), [stream]))
    assert out == f"{text}}}\n\ndata: [DONE]\n\n".encode()
    data = list(_sdk_events([out]))
    assert Completion.model_validate_json(data[0]).choices[0].text == "Hi"


_EVENT_KINDS = [
    f'data: {{"id":"c","choices":[],"usage":{_USAGE}}}',
    'data: {"id": "c", "choices": [], "usage": {"total_tokens": 3}}',
    f'data: {{"id":"c","choices":[{_choice(_DELTAS[2])}],"usage":null}}',
    'data: {"usage": null, "id": "c", "choices": [{"delta": {"content": "\\"usage\\":null"}}]}',
    'data: {"id":"c","choices":[{"delta":{"content":"x"}}]}',
    "data: [DONE]",
    "data: not json",
    ": keep-alive",
    "",
]


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    """Streams of OpenAI-like events, each with its own line ends and extra lines."""
    events = []
    for _ in range(draw(st.integers(1, 10))):
        end = draw(st.sampled_from(LINE_ENDS))
        lines = [draw(st.sampled_from(_EVENT_KINDS))]
        if draw(st.booleans()):
            lines.insert(0, draw(st.sampled_from([": c", "id: 4", "event: chunk", "retry: 9"])))
        events.append(end.join(line for line in lines if line) + end + end)
    return "".join(events).encode()


def _as_sdk_reads(pieces: list[bytes]) -> list[tuple[str | None, Any]]:
    read: list[tuple[str | None, Any]] = []
    for event in SSEDecoder().iter_bytes(iter(pieces)):
        if not event.data and event.event is None:
            continue  # nothing to the SDK (its decoder yields these for a kept id)
        try:
            read.append((event.event, json.loads(event.data)))
        except ValueError:
            read.append((event.event, event.data))
    return read


def _asked_for(read: list[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
    """The events a client that did not ask for usage reads (the SDK as the reference)."""
    asked = []
    for name, data in read:
        if isinstance(data, dict) and "usage" in data:
            if data["usage"] is not None and data.get("choices") == []:
                continue
            if data["usage"] is None:
                data = {key: value for key, value in data.items() if key != "usage"}
        asked.append((name, data))
    return asked


@settings(max_examples=300, deadline=None)
@given(stream=_streams(), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_the_sdk_reads_what_it_would_without_include_usage(stream: bytes, cuts: list[int]) -> None:
    edges = [0, *sorted(min(cut, len(stream)) for cut in cuts), len(stream)]
    pieces = _run(UsageEventFilter(), [stream[a:b] for a, b in itertools.pairwise(edges)])
    assert b"".join(pieces) == b"".join(_run(UsageEventFilter(), [stream]))
    assert _as_sdk_reads(pieces) == _asked_for(_as_sdk_reads([stream]))
