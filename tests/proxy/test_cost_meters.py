"""Cost meters (gateway.policies.cost): what a response cost, in micro-units, from the rule.

Pure unit tests: each feeds a meter the head and body chunks the proxy would hand it and
checks ``result()`` and ``problem``. The headers are the multidict proxy aiohttp gives.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from collections.abc import Iterable

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.model import CostRule
from gateway.policies.cost import MAX_EVENT, MAX_JSON_BODY, CostMeter, meter_for

JSON = (("Content-Type", "application/json"),)
SSE = (("Content-Type", "text/event-stream; charset=utf-8"),)
PATH = "usage.total_tokens"


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def measure(
    rule: CostRule,
    chunks: Iterable[bytes] = (),
    head: Iterable[tuple[str, str]] = JSON,
    status: int = 200,
) -> CostMeter:
    """A meter for rule after one response, fed the way the proxy feeds it."""
    meter = meter_for(rule)
    meter.see_headers(status, headers(*head))
    for chunk in chunks:
        if meter.needs_body:
            meter.feed(chunk)
    return meter


def cost(
    rule: CostRule, chunks: Iterable[bytes] = (), head: Iterable[tuple[str, str]] = JSON
) -> int:
    meter = measure(rule, chunks, head)
    micro = meter.result()
    assert meter.problem is None
    assert micro is not None
    return micro


def refused(
    rule: CostRule, chunks: Iterable[bytes] = (), head: Iterable[tuple[str, str]] = JSON
) -> str:
    meter = measure(rule, chunks, head)
    assert meter.result() is None
    assert meter.problem is not None
    return meter.problem


def event(data: object) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def openai_chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    return {
        "id": "chatcmpl-AbC123",
        "object": "chat.completion.chunk",
        "created": 1732000000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0ba0d124f1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 18,
    "total_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
# What OpenAI streams with stream_options.include_usage: usage is null on every chunk but
# the last, which has no choices; then the [DONE] sentinel.
OPENAI_STREAM = (
    b": OPENROUTER PROCESSING\n\n"
    + event(openai_chunk({"role": "assistant", "content": ""}))
    + event(openai_chunk({"content": "Hello"}))
    + event(openai_chunk({"content": ' there, \u00e9t\u00e9 "usage"'}))
    + event(openai_chunk({}, "stop"))
    + event({**openai_chunk({}), "choices": [], "usage": USAGE})
    + b"data: [DONE]\n\n"
)
TOKENS = CostRule(json=PATH, per_unit=0.000002)  # 30 tokens -> 60 micro-units


# --- meter_for ------------------------------------------------------------------------


def test_only_the_json_rule_needs_the_body() -> None:
    assert not meter_for(CostRule(fixed=1.0)).needs_body
    assert not meter_for(CostRule(header="X-Cost")).needs_body
    assert meter_for(CostRule(json=PATH)).needs_body


def test_a_rule_that_sets_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="one of fixed, header or json"):
        meter_for(CostRule())


# --- fixed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixed", "micro"),
    [(1.0, 1_000_000), (0.1, 100_000), (0.000002, 2), (0.0000005, 1), (0.00000049, 0), (0.0, 0)],
)
def test_fixed_cost_is_the_configured_credits(fixed: float, micro: int) -> None:
    assert cost(CostRule(fixed=fixed)) == micro


def test_fixed_cost_ignores_per_unit_headers_and_body() -> None:
    rule = CostRule(fixed=0.5, per_unit=3.0)
    assert cost(rule, [b"anything"], head=(("X-Cost", "9"),)) == 500_000
    meter = meter_for(rule)  # no head seen, feed called anyway
    meter.feed(b"x")
    assert meter.result() == 500_000


# --- header ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("0.0042", 4200),
        ("12", 12_000_000),
        ("1e-3", 1000),
        ("2.5E+2", 250_000_000),
        (" 0.5\t", 500_000),
        (".5", 500_000),
        ("5.", 5_000_000),
        ("0", 0),
        ("-0", 0),
        ("0.0000025", 3),  # 2.5 micro-units round half up (as a float it is 2.4999...)
        ("0.00000249", 2),
        ("1e-999999999", 0),
        ("1000000000", 10**15),  # the largest accepted: 1e9 credits
    ],
)
def test_header_cost_is_the_decimal_number_in_micro_units(value: str, micro: int) -> None:
    assert cost(CostRule(header="X-Usage-Cost"), head=(("X-Usage-Cost", value),)) == micro


def test_header_name_is_case_insensitive_and_a_plain_mapping_works_too() -> None:
    assert cost(CostRule(header="X-Usage-Cost"), head=(("x-usage-cost", "1"),)) == 1_000_000
    meter = meter_for(CostRule(header="X-Usage-Cost"))
    meter.see_headers(200, {"X-Usage-Cost": "2"})
    assert meter.result() == 2_000_000


@pytest.mark.parametrize(
    ("value", "per_unit", "micro"),
    [
        ("3", 0.000002, 6),  # 3 tokens at 0.000002 credits: exactly 6, never 5.999...
        ("0.1", 3.0, 300_000),  # 0.1 * 3 is 0.30000000000000004 in floats
        ("0.1", 0.2, 20_000),
        ("3", 0.0000135, 41),  # 40.5 exactly, half up; floats say 40.4999...
        ("3", 0.0000175, 53),
        ("12345678901234567", 0.000000000001, 12_345_678_901),  # beyond float precision
        ("7", 0.0, 0),
    ],
)
def test_header_value_times_per_unit_is_exact(value: str, per_unit: float, micro: int) -> None:
    rule = CostRule(header="X-Units", per_unit=per_unit)
    assert cost(rule, head=(("X-Units", value),)) == micro


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-1", "X-Usage-Cost is negative"),
        ("-0.000001", "X-Usage-Cost is negative"),
        ("NaN", "X-Usage-Cost 'NaN' is not a decimal number"),
        ("nan", "X-Usage-Cost 'nan' is not a decimal number"),
        ("Infinity", "X-Usage-Cost 'Infinity' is not a decimal number"),
        ("inf", "X-Usage-Cost 'inf' is not a decimal number"),
        ("", "X-Usage-Cost '' is not a decimal number"),
        ("abc", "X-Usage-Cost 'abc' is not a decimal number"),
        ("1,5", "X-Usage-Cost '1,5' is not a decimal number"),
        ("0x10", "X-Usage-Cost '0x10' is not a decimal number"),
        ("1_000", "X-Usage-Cost '1_000' is not a decimal number"),
        ("+1", "X-Usage-Cost '+1' is not a decimal number"),
        ("1e", "X-Usage-Cost '1e' is not a decimal number"),
        ("\uff11\uff12", "X-Usage-Cost '\uff11\uff12' is not a decimal number"),
        ("1000000000.000001", "X-Usage-Cost is too large"),
        ("1e13", "X-Usage-Cost is too large"),
        ("1e999999999", "X-Usage-Cost is too large"),
    ],
)
def test_an_unusable_header_value_gives_no_cost(value: str, problem: str) -> None:
    assert refused(CostRule(header="X-Usage-Cost"), head=(("X-Usage-Cost", value),)) == problem


def test_per_unit_can_push_a_header_cost_over_the_limit() -> None:
    rule = CostRule(header="X-Units", per_unit=10_000.0)
    assert refused(rule, head=(("X-Units", "100000.0001"),)) == "X-Units is too large"
    assert cost(rule, head=(("X-Units", "100000"),)) == 10**15


def test_a_missing_header_gives_no_cost() -> None:
    assert refused(CostRule(header="X-Usage-Cost"), head=JSON) == "no X-Usage-Cost header"
    assert meter_for(CostRule(header="X-Usage-Cost")).result() is None  # no head at all


def test_a_header_given_twice_must_agree() -> None:
    rule = CostRule(header="X-Cost")
    twice = (("X-Cost", "0.5"), ("x-cost", "0.25"))
    assert refused(rule, head=twice) == "X-Cost given more than once with different values"
    assert cost(rule, head=(("X-Cost", "0.5"), ("x-cost", "0.5 "))) == 500_000


def test_a_header_problem_shows_no_other_header_and_stays_short() -> None:
    head = (
        ("Authorization", "Bearer sk-secret"),
        ("Set-Cookie", "s=secret"),
        ("X-Cost", "x" * 500),
    )
    problem = refused(CostRule(header="X-Cost"), head=head)
    assert "secret" not in problem
    assert len(problem) < 120


# --- json: a plain body ---------------------------------------------------------------


def test_json_body_cost_is_the_number_at_the_path_times_per_unit() -> None:
    body = json.dumps({"id": "x", "usage": {"prompt_tokens": 12, "total_tokens": 30}}).encode()
    assert cost(TOKENS, [body]) == 60
    assert cost(TOKENS, [body[:7], body[7:8], body[8:]]) == 60
    assert cost(TOKENS, [bytes([b]) for b in body]) == 60


@pytest.mark.parametrize(
    ("number", "per_unit", "micro"),
    [
        ("30", 0.000002, 60),
        ("0.1", 3.0, 300_000),
        ("3", 0.0000135, 41),
        ("0.0000025", 1.0, 3),
        ("2.5e-6", 1.0, 3),
        ("123456789012345678901234567890", 1e-30, 123_457),  # 123456.789... micro
    ],
)
def test_json_numbers_are_read_exactly(number: str, per_unit: float, micro: int) -> None:
    body = b'{"usage": {"total_tokens": ' + number.encode() + b"}}"
    assert cost(CostRule(json=PATH, per_unit=per_unit), [body]) == micro


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"usage": {"total_tokens": null}}', "usage.total_tokens is null, not a number"),
        (b'{"usage": {"total_tokens": "30"}}', "usage.total_tokens is a string, not a number"),
        (b'{"usage": {"total_tokens": true}}', "usage.total_tokens is a boolean, not a number"),
        (b'{"usage": {"total_tokens": [30]}}', "usage.total_tokens is an array, not a number"),
        (b'{"usage": {"total_tokens": {}}}', "usage.total_tokens is an object, not a number"),
        (b'{"usage": {"total_tokens": -1}}', "usage.total_tokens is negative"),
        (b'{"usage": {"total_tokens": NaN}}', "usage.total_tokens is not a finite number"),
        (b'{"usage": {"total_tokens": Infinity}}', "usage.total_tokens is not a finite number"),
        (b'{"usage": {"total_tokens": 1e400000000000000000000}}', "the body is not JSON"),
        (b'{"usage": {"total_tokens": 1e19}}', "usage.total_tokens is too large"),
        (b'{"usage": {"prompt_tokens": 3}}', "no usage.total_tokens in the JSON"),
        (b'{"usage": null}', "no usage.total_tokens in the JSON"),
        (b'{"usage": [1]}', "no usage.total_tokens in the JSON"),
        (b"[1, 2]", "no usage.total_tokens in the JSON"),
        (b'{"usage": {"total_tokens": 30}', "the body is not JSON"),
        (b"<html>Bad gateway</html>", "the body is not JSON"),
        (b"\xff\xfe\xfd", "the body is not JSON"),
        (b"[" * 200_000 + b"]" * 200_000, "the body is not JSON"),
        (b"", "the body is empty"),
    ],
)
def test_a_json_body_without_a_usable_number_gives_no_cost(body: bytes, problem: str) -> None:
    assert refused(TOKENS, [body]) == problem


def test_a_json_problem_quotes_no_body_content() -> None:
    body = b'{"secret": "sk-live-123", "usage": {"total_tokens": "sk-live-123"}}'
    assert "sk-live" not in refused(TOKENS, [body])


def test_any_non_sse_content_type_or_none_is_a_plain_body() -> None:
    body = b'{"usage": {"total_tokens": 30}}'
    assert cost(TOKENS, [body], head=(("Content-Type", "application/json; charset=utf-8"),)) == 60
    assert cost(TOKENS, [body], head=()) == 60
    assert cost(TOKENS, [body], head=(("Content-Type", "text/plain"),)) == 60


def test_a_json_body_up_to_the_cap_is_read() -> None:
    body = b'{"usage": {"total_tokens": 30}}'
    padded = body + b" " * (MAX_JSON_BODY - len(body))
    assert cost(TOKENS, [padded[:1000], padded[1000:]]) == 60


def test_a_json_body_over_the_cap_gives_no_cost_and_stops_needing_the_body() -> None:
    body = b'{"usage": {"total_tokens": 30}}'
    padded = body + b" " * (MAX_JSON_BODY - len(body) + 1)
    meter = measure(TOKENS, [padded[:1000], padded[1000:]])
    assert not meter.needs_body
    meter.feed(b"more")  # still safe
    assert meter.result() is None
    assert meter.problem == f"body larger than {MAX_JSON_BODY} bytes"


def test_a_cut_short_json_body_is_not_json() -> None:
    body = b'{"usage": {"total_tokens": 30}, "choices": []}'
    assert refused(TOKENS, [body[:20]]) == "the body is not JSON"


# --- json: compressed bodies (the proxy passes bytes through as encoded) -----------------


def test_gzip_and_deflate_bodies_are_inflated() -> None:
    body = json.dumps({"usage": {"total_tokens": 30}, "pad": "x" * 5000}).encode()
    packed = gzip.compress(body)
    head = (*JSON, ("Content-Encoding", "gzip"))
    assert cost(TOKENS, [packed], head=head) == 60
    assert cost(TOKENS, [packed[i : i + 7] for i in range(0, len(packed), 7)], head=head) == 60
    deflated = zlib.compress(body)
    assert cost(TOKENS, [deflated], head=(*JSON, ("Content-Encoding", "deflate"))) == 60


def test_a_gzip_bomb_stops_at_the_body_cap() -> None:
    packed = gzip.compress(b" " * (50 * MAX_JSON_BODY))
    meter = measure(TOKENS, [packed], head=(*JSON, ("Content-Encoding", "gzip")))
    assert meter.result() is None
    assert meter.problem == f"body larger than {MAX_JSON_BODY} bytes"


def test_a_corrupt_or_unknown_encoding_gives_no_cost() -> None:
    gz = (*JSON, ("Content-Encoding", "gzip"))
    assert refused(TOKENS, [b"not gzip at all"], head=gz) == "the compressed body is corrupt"
    br = (*JSON, ("Content-Encoding", "br"))
    problem = "the body's Content-Encoding is neither gzip nor deflate"
    assert refused(TOKENS, [b"\x1b\x03"], head=br) == problem


def test_a_gzip_event_stream_is_inflated_too() -> None:
    packed = gzip.compress(OPENAI_STREAM)
    head = (*SSE, ("Content-Encoding", "gzip"))
    assert cost(TOKENS, [packed[i : i + 50] for i in range(0, len(packed), 50)], head=head) == 60
    assert cost(TOKENS, [packed[:-8]], head=head) == 60  # cut short: no gzip trailer


# --- json: server-sent events ---------------------------------------------------------


def test_an_openai_stream_split_at_every_byte_offset_costs_the_final_usage() -> None:
    for i in range(len(OPENAI_STREAM) + 1):
        assert cost(TOKENS, [OPENAI_STREAM[:i], OPENAI_STREAM[i:]], head=SSE) == 60, i


def test_an_openai_stream_fed_byte_by_byte_costs_the_final_usage() -> None:
    assert cost(TOKENS, [bytes([b]) for b in OPENAI_STREAM], head=SSE) == 60


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_line_ends_split_anywhere(newline: bytes) -> None:
    stream = OPENAI_STREAM.replace(b"\n", newline)
    for i in range(len(stream) + 1):
        assert cost(TOKENS, [stream[:i], stream[i:]], head=SSE) == 60, i
    for step in (1, 2, 3, 5, 8):
        chunks = [stream[j : j + step] for j in range(0, len(stream), step)]
        assert cost(TOKENS, chunks, head=SSE) == 60, step


def test_three_way_splits_of_a_crlf_usage_event() -> None:
    stream = b"data: [DONE]\r\n\r\n" + event({"usage": {"total_tokens": 4}}).replace(b"\n", b"\r\n")
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert cost(TOKENS, [stream[:i], stream[i:j], stream[j:]], head=SSE) == 8


def test_a_cr_then_lf_across_chunks_is_one_line_end() -> None:
    # "\r" | "\n" must end one line, not also make a blank line that ends the event early.
    chunks = [b'data: {"usage":\r', b'\ndata: {"total_tokens": 5}}\r', b"\n\r\n"]
    assert cost(TOKENS, chunks, head=SSE) == 10


def test_multi_line_data_joins_with_newlines() -> None:
    stream = b'data: {"usage":\ndata:  {"total_tokens":\ndata:7}}\n\n'
    assert cost(TOKENS, [stream], head=SSE) == 14


def test_comments_and_other_fields_are_ignored() -> None:
    stream = (
        b": keep-alive\n\n"
        b'event: message\nid: 41\nretry: 1000\n: a comment with "usage"\n'
        b'data: {"usage": {"total_tokens": 9}}\n\n'
        b'data_x: {"usage": {"total_tokens": 99}}\n\n'
        b'data {"usage": {"total_tokens": 98}}\n\n'
    )
    assert cost(TOKENS, [stream], head=SSE) == 18


def test_the_last_event_with_a_number_counts() -> None:
    stream = (
        event({"usage": {"total_tokens": 10}})
        + event({"usage": {"total_tokens": 30}})
        + event({"usage": None})
        + event({"usage": {"total_tokens": "40"}})
        + event(["usage"])
        + b'data: {"usage": {"total_tokens": \n\n'
        + b"data: [DONE]\n\n"
    )
    assert cost(TOKENS, [stream], head=SSE) == 60


def test_a_stream_without_usage_gives_no_cost() -> None:
    stream = event(openai_chunk({"content": "hi"})) + b"data: [DONE]\n\n"
    assert refused(TOKENS, [stream], head=SSE) == "no event carried usage.total_tokens"
    elsewhere = event({"usage": None, "stats": {"total_tokens": 30}})
    assert refused(TOKENS, [elsewhere], head=SSE) == (
        "no event carried a number at usage.total_tokens (last: no usage.total_tokens in the JSON)"
    )
    assert refused(TOKENS, [b"data: [DONE]\n\n"], head=SSE) == "no event carried usage.total_tokens"
    assert refused(TOKENS, [], head=SSE) == "no event carried usage.total_tokens"
    null = event({"usage": {"total_tokens": None}})
    assert refused(TOKENS, [null], head=SSE) == (
        "no event carried a number at usage.total_tokens "
        "(last: usage.total_tokens is null, not a number)"
    )
    true = event({"usage": {"total_tokens": True}})
    assert "is a boolean" in refused(TOKENS, [true], head=SSE)


def test_an_event_number_is_checked_like_any_other() -> None:
    assert refused(TOKENS, [event({"usage": {"total_tokens": -3}})], head=SSE) == (
        "usage.total_tokens is negative"
    )


def test_a_stream_cut_short_counts_the_last_complete_event() -> None:
    end = OPENAI_STREAM.index(b"data: [DONE]")
    usage_start = OPENAI_STREAM.rindex(b"data: {", 0, end)
    assert cost(TOKENS, [OPENAI_STREAM[:end]], head=SSE) == 60  # before [DONE]
    for cut in (usage_start, usage_start + 40, end - 2, end - 1):  # the event never ended
        assert refused(TOKENS, [OPENAI_STREAM[:cut]], head=SSE).startswith("no event"), cut
    earlier = event({"usage": {"total_tokens": 2}})
    unfinished = b'data: {"usage": {"total_tokens": 30}}\n'
    assert cost(TOKENS, [earlier + unfinished], head=SSE) == 4


def test_a_huge_event_is_skipped_and_the_others_still_count() -> None:
    filler = "x" * MAX_EVENT
    huge = event({"usage": {"total_tokens": 999}, "pad": filler})
    stream = event({"usage": {"total_tokens": 30}}) + huge
    chunks = [stream[i : i + 65_536] for i in range(0, len(stream), 65_536)]
    assert cost(TOKENS, chunks, head=SSE) == 60
    after = huge + event({"usage": {"total_tokens": 5}})
    assert cost(TOKENS, [after[i : i + 4096] for i in range(0, len(after), 4096)], head=SSE) == 10
    assert refused(TOKENS, [huge], head=SSE) == (
        f"no event carried usage.total_tokens (1 events over {MAX_EVENT} bytes skipped)"
    )


def test_a_huge_event_of_many_short_lines_is_skipped() -> None:
    lines = b"data: 0123456789abcdef\n" * (MAX_EVENT // 16)
    stream = b'data: {"usage": {"total_tokens": 999},\n' + lines + b"data: }\n\n"
    stream += event({"usage": {"total_tokens": 30}})
    assert cost(TOKENS, [stream[i : i + 10_000] for i in range(0, len(stream), 10_000)], SSE) == 60


def test_an_event_just_under_the_limit_is_read() -> None:
    data = b'{"usage": {"total_tokens": 30}}'
    stream = b"data: " + data + b" " * (MAX_EVENT - len(data)) + b"\n\n"
    assert cost(TOKENS, [stream[:100], stream[100:]], head=SSE) == 60
    over = b"data: " + data + b" " * (MAX_EVENT - len(data) + 1) + b"\n\n"
    assert refused(TOKENS, [over[:100], over[100:]], head=SSE).startswith("no event")


def test_a_huge_comment_does_not_skip_its_event() -> None:
    stream = b":" + b"c" * (2 * MAX_EVENT) + b"\n" + event({"usage": {"total_tokens": 30}})
    assert cost(TOKENS, [stream[i : i + 65_536] for i in range(0, len(stream), 65_536)], SSE) == 60


def test_event_stream_content_type_is_matched_case_insensitively() -> None:
    stream = event({"usage": {"total_tokens": 30}}) + b"data: [DONE]\n\n"
    assert cost(TOKENS, [stream], head=(("content-type", "Text/Event-Stream"),)) == 60
    # Read as one plain body, the same bytes are not JSON.
    assert refused(TOKENS, [stream], head=JSON) == "the body is not JSON"


# --- memory stays bounded whatever the upstream sends -----------------------------------


def peak_bytes_while_feeding(meter: CostMeter, chunk: bytes, times: int, end: bytes) -> int:
    tracemalloc.start()
    try:
        for _ in range(times):
            meter.feed(chunk[:1] + chunk[1:])  # a new object each time, as from a socket
        meter.feed(end)
        meter.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_endless_event_line_is_not_kept() -> None:
    meter = measure(TOKENS, [b'data: {"usage": {"total_tokens": 1}, "pad": "'], head=SSE)
    peak = peak_bytes_while_feeding(meter, b"x" * 65_536, 256, b'"}\n\n')  # 16 MiB
    assert peak < 3 * MAX_EVENT
    assert meter.result() is None


def test_an_endless_json_body_is_not_kept() -> None:
    meter = measure(TOKENS, [b'{"pad": "'])
    peak = peak_bytes_while_feeding(meter, b"x" * 65_536, 256, b'"}')
    assert peak < 2 * MAX_JSON_BODY
    assert meter.problem == f"body larger than {MAX_JSON_BODY} bytes"
