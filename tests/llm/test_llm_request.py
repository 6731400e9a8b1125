"""read_request: what an LLM request's body asks for, or the client error naming the field;
with_usage_requested: the body that makes an OpenAI stream carry its usage."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from gateway.config.model import LlmApi
from gateway.policies.llm_request import read_request, with_usage_requested
from gateway.policies.llm_usage import LlmRequest

_MESSAGES = [{"role": "user", "content": "Say hi in French: « salut » 👋"}]


def _body(**members: Any) -> bytes:
    """A body as the openai SDK sends it (httpx: compact, UTF-8)."""
    return json.dumps(members, separators=(",", ":"), ensure_ascii=False).encode()


def test_an_openai_chat_stream() -> None:
    body = _body(model="gpt-4o-mini", messages=_MESSAGES, stream=True, max_completion_tokens=200)
    assert read_request("openai", body) == LlmRequest(
        model="gpt-4o-mini",
        stream=True,
        max_output_tokens=200,
        body_bytes=len(body),
        usage_requested=False,
    )


def test_a_stream_that_asked_for_usage() -> None:
    body = _body(model="m", stream=True, stream_options={"include_usage": True})
    request = read_request("openai", body)
    assert isinstance(request, LlmRequest) and request.usage_requested


@pytest.mark.parametrize(
    ("members", "bound"),
    [
        ({"max_tokens": 500, "max_completion_tokens": 300}, 300),
        ({"max_tokens": 20, "max_completion_tokens": 300}, 20),
        ({"max_output_tokens": 64}, 64),  # the Responses API
        ({"max_tokens": 100, "n": 3}, 300),  # three answers, each up to 100
        ({"max_tokens": 100, "n": 2, "best_of": 4}, 400),  # Completions: best_of generated
        ({"n": 3}, None),
        ({}, None),
    ],
)
def test_the_output_bound(members: dict[str, Any], bound: int | None) -> None:
    request = read_request("openai", _body(model="m", prompt="x", **members))
    assert isinstance(request, LlmRequest)
    assert request.max_output_tokens == bound


def test_an_anthropic_message_reads_its_own_bound_only() -> None:
    # An Anthropic upstream ignores the others: they must not lower the reservation.
    body = _body(
        model="claude-sonnet-4-5",
        max_tokens=1024,
        max_completion_tokens=10,
        n=5,
        stream=True,
        stream_options={"include_usage": False},
        messages=_MESSAGES,
    )
    assert read_request("anthropic", body) == LlmRequest(
        model="claude-sonnet-4-5",
        stream=True,
        max_output_tokens=1024,
        body_bytes=len(body),
        usage_requested=False,
    )


def test_an_embeddings_request_is_no_stream() -> None:
    body = _body(model="text-embedding-3-small", input=["a", "b"], encoding_format="float")
    request = read_request("openai", body)
    assert isinstance(request, LlmRequest)
    assert (request.model, request.stream, request.max_output_tokens) == (
        "text-embedding-3-small",
        False,
        None,
    )


@pytest.mark.parametrize("body", [b'{"messages":[]}', b'{"model":null,"messages":[]}'])
def test_a_body_without_a_model_reads_model_none(body: bytes) -> None:
    request = read_request("openai", body)
    assert isinstance(request, LlmRequest) and request.model is None


def test_null_reads_as_absent() -> None:
    body = b'{"model":"m","stream":null,"max_tokens":null,"n":null,"stream_options":null}'
    assert read_request("openai", body) == LlmRequest(
        model="m", stream=False, max_output_tokens=None, body_bytes=len(body), usage_requested=False
    )


def test_a_pretty_printed_body_reads_the_same() -> None:
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 9}, indent=2).encode()
    request = read_request("openai", b"\n " + body + b"\r\n")
    assert isinstance(request, LlmRequest)
    assert (request.model, request.stream, request.max_output_tokens) == ("m", True, 9)


@pytest.mark.parametrize(
    ("api", "body", "error"),
    [
        ("openai", b"", "body: not JSON"),
        ("openai", b'{"model":"m"', "body: not JSON"),
        ("openai", b'{"model":"m"} {}', "body: not JSON"),
        ("openai", b'{"model":"m","temperature":NaN}', "body: not JSON"),
        ("openai", b'{"model":"m",}', "body: not JSON"),
        ("openai", b"model=m", "body: not JSON"),
        ("openai", b'{"model":"\xff"}', "body: not UTF-8"),
        ("openai", b'["model","m"]', "body: must be a JSON object"),
        ("openai", b'"m"', "body: must be a JSON object"),
        ("openai", b'{"model":7}', "model: must be a string"),
        ("openai", b'{"model":["m"]}', "model: must be a string"),
        ("anthropic", b'{"model":""}', "model: must not be empty"),
        ("openai", b'{"model":"m","stream":"true"}', "stream: must be true or false"),
        ("anthropic", b'{"model":"m","stream":1}', "stream: must be true or false"),
        ("openai", b'{"model":"m","max_tokens":0}', "max_tokens: must be a positive integer"),
        ("anthropic", b'{"model":"m","max_tokens":-1}', "max_tokens: must be a positive integer"),
        ("openai", b'{"max_tokens":1.5}', "max_tokens: must be a positive integer"),
        ("openai", b'{"max_tokens":100.0}', "max_tokens: must be a positive integer"),
        ("openai", b'{"max_tokens":"100"}', "max_tokens: must be a positive integer"),
        ("openai", b'{"max_tokens":true}', "max_tokens: must be a positive integer"),
        (
            "openai",
            b'{"max_completion_tokens":[5]}',
            "max_completion_tokens: must be a positive integer",
        ),
        ("openai", b'{"max_output_tokens":0}', "max_output_tokens: must be a positive integer"),
        ("openai", b'{"n":0}', "n: must be a positive integer"),
        ("openai", b'{"best_of":"2"}', "best_of: must be a positive integer"),
        ("openai", b'{"stream_options":true}', "stream_options: must be an object"),
        (
            "openai",
            b'{"stream":true,"stream_options":{"include_usage":"yes"}}',
            "stream_options.include_usage: must be true or false",
        ),
        ("openai", b'{"stream":false,"stream":true}', "stream: given more than once"),
        ("anthropic", b'{"model":"a","model":"b"}', "model: given more than once"),
    ],
)
def test_a_bad_field_is_named(api: LlmApi, body: bytes, error: str) -> None:
    assert read_request(api, body) == error


def test_members_it_does_not_read_are_not_checked() -> None:
    body = b'{"model":"m","metadata":1,"metadata":2,"temperature":0.1}'
    assert isinstance(read_request("openai", body), LlmRequest)


def _loads(body: bytes) -> Any:
    return json.loads(body, parse_float=Decimal)


def _rewritten(body: bytes) -> bytes:
    new = with_usage_requested(body)
    assert new is not None
    assert json.loads(body) != json.loads(new)  # a real difference upstream
    request = read_request("openai", new)
    assert isinstance(request, LlmRequest) and request.usage_requested
    return new


def test_a_stream_without_stream_options_gets_them() -> None:
    body = _body(model="gpt-4o-mini", messages=_MESSAGES, stream=True, temperature=0.1)
    new = _rewritten(body)
    assert _loads(new) == {**_loads(body), "stream_options": {"include_usage": True}}
    assert new == body.replace(
        b'"stream":true,', b'"stream":true,"stream_options":{"include_usage":true},'
    )


@pytest.mark.parametrize(
    ("options", "rewritten"),
    [
        (b"null", b'{"include_usage":true}'),
        (b"{}", b'{"include_usage":true}'),
        (b"{ }", b'{"include_usage":true }'),
        (b'{"include_usage":false}', b'{"include_usage":true}'),
        (b'{"include_usage": null}', b'{"include_usage": true}'),
        (
            b'{"include_obfuscation":false,"x":{"y":1}}',
            b'{"include_obfuscation":false,"x":{"y":1},"include_usage":true}',
        ),
        (
            b'{"include_usage":false,"include_obfuscation":false}',
            b'{"include_usage":true,"include_obfuscation":false}',
        ),
    ],
)
def test_stream_options_keep_their_other_members(options: bytes, rewritten: bytes) -> None:
    body = b'{"model":"m","stream":true,"stream_options":%s,"top_p":1}' % options
    new = _rewritten(body)
    assert new == b'{"model":"m","stream":true,"stream_options":%s,"top_p":1}' % rewritten
    assert _loads(new)["stream_options"] == {
        **(_loads(options) or {}),
        "include_usage": True,
    }


def test_numbers_and_member_order_stay_the_clients() -> None:
    body = (
        b'{"temperature": 0.1, "top_p": 1e400, "seed": 12345678901234567890123,\n'
        b' "logit_bias": {"50256": -100.000}, "stream": true, "model": "m",\n'
        b' "messages": [{"role": "user", "content": "caf\\u00e9 \xc3\xa9"}]}'
    )
    new = _rewritten(body)
    assert new == body.replace(
        b'"stream": true,', b'"stream": true,"stream_options":{"include_usage":true},'
    )
    assert list(_loads(new)) == [
        "temperature",
        "top_p",
        "seed",
        "logit_bias",
        "stream",
        "stream_options",
        "model",
        "messages",
    ]
    assert _loads(new)["temperature"] == Decimal("0.1")


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        b'{"model":"m","stream":false}',
        b'{"model":"m"}',
        b'{"model":"m","input":"embed me"}',
        b'{"model":"m","stream":"true"}',
        b'{"model":"m","stream":true,"stream_options":[]}',
        b'{"model":"m","stream":true,"stream":true}',
        b'{"model":"m","stream":true',
        b"[1]",
        b"\xff",
    ],
)
def test_nothing_to_change(body: bytes) -> None:
    assert with_usage_requested(body) is None
