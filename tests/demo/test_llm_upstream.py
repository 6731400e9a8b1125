"""The sample upstream's LLM APIs through the official ``openai`` and ``anthropic`` SDKs,
pointed at it directly: the SDKs parse every answer, and the usage is the documented one
(``gateway.demo.llm_usage.expected_usage``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import httpx
import httpx2
import openai
import pytest
from genai_prices import Usage, calc_price

from gateway.demo.llm_usage import (
    ANTHROPIC_MODEL,
    EMBEDDING_MODEL,
    OPENAI_MODELS,
    UNPRICED_MODEL,
    InvalidRequest,
    expected_deltas,
    expected_usage,
)
from gateway.demo.upstream import MODELS, start_upstream

FAST = {"X-Demo-Delay": "0"}
# What an abruptly closed stream looks like to each SDK's transport (the anthropic SDK
# brings its own httpx fork).
CUT_ERRORS = (httpx.TransportError, httpx2.TransportError, openai.APIError, anthropic.APIError)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    runner, bound = await start_upstream()
    yield bound
    await runner.cleanup()


@pytest.fixture
async def oai(port: int) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-dummy", max_retries=0
    )
    async with client:
        yield client


@pytest.fixture
async def claude(port: int) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{port}", api_key="sk-ant-dummy", max_retries=0
    )
    async with client:
        yield client


def _chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "answer in one line"},
        {"role": "user", "content": text},
    ]
    return {"model": model, "messages": messages, **extra}


# ---------------------------------------------------------------------- the models


def test_the_models_are_priced_apart_by_genai_prices_and_one_is_unpriced() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=500_000)
    prices = {calc_price(usage, model, provider_id="openai").total_price for model in OPENAI_MODELS}
    prices.add(calc_price(usage, ANTHROPIC_MODEL, provider_id="anthropic").total_price)
    assert len(prices) == 3
    for provider in ("openai", "anthropic"):
        with pytest.raises(LookupError):
            calc_price(usage, UNPRICED_MODEL, provider_id=provider)


async def test_models_lists_every_model(oai: openai.AsyncOpenAI) -> None:
    listed = [m.id async for m in oai.models.list()]
    assert listed == list(MODELS)
    assert {*OPENAI_MODELS, ANTHROPIC_MODEL, UNPRICED_MODEL, EMBEDDING_MODEL} <= set(listed)


# ---------------------------------------------------------------------- chat completions


async def test_chat_usage_has_openai_details_and_the_documented_counts(
    oai: openai.AsyncOpenAI,
) -> None:
    body = _chat("gpt-4o", "what does caching cost")
    headers = {"X-Demo-Cached-Tokens": "3", "X-Demo-Reasoning-Tokens": "2"}
    completion = await oai.chat.completions.create(**body, extra_headers=headers)
    assert completion.choices[0].message.content == "Echo: what does caching cost"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.to_dict() == expected_usage("chat", body, headers)
    # 4 + 4 words in; "Echo:" + 4 words and 2 reasoning tokens out
    assert completion.usage.to_dict() == {
        "prompt_tokens": 8,
        "completion_tokens": 7,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 2,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def test_demo_models_answer_a_bare_usage_block(oai: openai.AsyncOpenAI) -> None:
    body = _chat("demo-small", "a b c")
    completion = await oai.chat.completions.create(**body)
    assert completion.usage is not None
    assert completion.usage.to_dict() == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
    }


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
async def test_chat_cap_truncates_reasoning_first_with_finish_reason_length(
    oai: openai.AsyncOpenAI, cap: str
) -> None:
    body = _chat("gpt-4o-mini", "one two three four", **{cap: 4})
    headers = {"X-Demo-Reasoning-Tokens": "2"}
    completion = await oai.chat.completions.create(**body, extra_headers=headers)
    assert completion.choices[0].message.content == "Echo: one"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    assert completion.usage.to_dict() == expected_usage("chat", body, headers)


async def test_chat_stream_with_include_usage_ends_with_a_usage_only_chunk(
    oai: openai.AsyncOpenAI,
) -> None:
    body = _chat("gpt-4o-mini", "stream me", stream_options={"include_usage": True})
    headers = {**FAST, "X-Demo-Cached-Tokens": "5"}
    stream = await oai.chat.completions.create(**body, stream=True, extra_headers=headers)
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    *deltas, last = chunks
    assert all("usage" in c.to_dict() and c.usage is None for c in deltas)
    texts = [c.choices[0].delta.content for c in deltas if c.choices[0].delta.content]
    assert tuple(texts) == expected_deltas("chat", body) == ("Echo:", " stream", " me")
    assert deltas[-1].choices[0].finish_reason == "stop"
    assert last.choices == [] and last.usage is not None
    assert last.usage.to_dict() == expected_usage("chat", {**body, "stream": True}, headers)
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 5


async def test_chat_stream_without_include_usage_carries_no_usage(
    oai: openai.AsyncOpenAI,
) -> None:
    stream = await oai.chat.completions.create(
        **_chat("gpt-4o", "no usage please"), stream=True, extra_headers=FAST
    )
    chunks = [chunk async for chunk in stream]
    assert all("usage" not in c.to_dict() and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: no usage please"


async def test_chat_stream_cut_after_n_deltas_ends_without_finish_or_usage(
    oai: openai.AsyncOpenAI,
) -> None:
    body = _chat("gpt-4o-mini", "a b c d e", stream_options={"include_usage": True})
    stream = await oai.chat.completions.create(
        **body, stream=True, extra_headers={**FAST, "X-Demo-Cut-After": "2"}
    )
    chunks = []
    with pytest.raises(CUT_ERRORS):
        async for chunk in stream:
            chunks.append(chunk)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert tuple(texts) == expected_deltas("chat", body)[:2] == ("Echo:", " a")
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in chunks)


async def test_a_cut_past_the_last_delta_drops_only_the_ending(port: int) -> None:
    body = _chat("gpt-4o", "x y", stream=True, stream_options={"include_usage": True})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        response = await session.post(url, json=body, headers={**FAST, "X-Demo-Cut-After": "99"})
        assert response.status == 200
        lines = []
        with pytest.raises(aiohttp.ClientPayloadError):
            while line := await response.content.readline():
                lines.append(line)
    seen = b"".join(lines)
    assert b'"content":" y"' in seen
    assert b'"finish_reason":"stop"' not in seen and b"[DONE]" not in seen


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"X-Demo-Cached-Tokens": "7"}, _chat("gpt-4o", "two words")),  # 6 input tokens
        ({"X-Demo-Cut-After": "-1"}, _chat("gpt-4o", "hi")),
        ({"X-Demo-Reasoning-Tokens": "many"}, _chat("gpt-4o", "hi")),
    ],
)
async def test_impossible_demo_headers_are_400(
    oai: openai.AsyncOpenAI, headers: dict[str, str], body: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(**body, extra_headers=headers)
    with pytest.raises(InvalidRequest):
        expected_usage("chat", body, headers)


# ---------------------------------------------------------------------- completions, embeddings


async def test_legacy_completions_json_and_stream(oai: openai.AsyncOpenAI) -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "prompt": ["first prompt", "say this back"],
        "max_tokens": 3,
    }
    completion = await oai.completions.create(**body)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "Echo: say this"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.to_dict() == expected_usage("completions", body)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 3)

    stream = await oai.completions.create(
        **body, stream=True, stream_options={"include_usage": True}, extra_headers=FAST
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: say this"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.to_dict() == expected_usage("completions", body)


@pytest.mark.parametrize("encoding", ["float", None])  # None: the SDK's default, base64
async def test_embeddings_are_deterministic_with_input_usage(
    oai: openai.AsyncOpenAI, encoding: str | None
) -> None:
    body: dict[str, Any] = {"model": EMBEDDING_MODEL, "input": ["hello world", [1, 2, 3]]}
    extra: dict[str, Any] = {"encoding_format": encoding} if encoding else {}
    first = await oai.embeddings.create(**body, **extra)
    again = await oai.embeddings.create(**body, encoding_format="float", dimensions=8)
    assert [e.index for e in first.data] == [0, 1]
    assert [e.embedding for e in first.data] == [e.embedding for e in again.data]
    assert all(len(e.embedding) == 8 for e in first.data)
    assert first.data[0].embedding != first.data[1].embedding
    assert first.usage.to_dict() == expected_usage("embeddings", body)
    assert first.usage.to_dict() == {"prompt_tokens": 5, "total_tokens": 5}


# ---------------------------------------------------------------------- responses


async def test_responses_json_usage_and_a_truncated_answer(oai: openai.AsyncOpenAI) -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "instructions": "be terse",
        "input": "tell me a thing",
    }
    headers = {"X-Demo-Cached-Tokens": "2", "X-Demo-Reasoning-Tokens": "3"}
    response = await oai.responses.create(**body, extra_headers=headers)
    assert response.status == "completed" and response.output_text == "Echo: tell me a thing"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.usage is not None
    assert response.usage.to_dict() == expected_usage("responses", body, headers)
    assert response.usage.to_dict() == {
        "input_tokens": 6,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens": 8,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 14,
    }

    capped: dict[str, Any] = {**body, "max_output_tokens": 5}
    response = await oai.responses.create(**capped, extra_headers=headers)
    assert response.status == "incomplete" and response.output_text == "Echo: tell"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5


async def test_responses_stream_events_and_final_usage(oai: openai.AsyncOpenAI) -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi there"}]}],
    }
    async with oai.responses.stream(**body, extra_headers=FAST) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_text.delta") == len(expected_deltas("responses", body))
    assert kinds[-1] == "response.completed"
    assert final.output_text == "Echo: hi there"
    assert final.usage is not None
    assert final.usage.to_dict() == expected_usage("responses", body)


async def test_responses_stream_with_reasoning_capped_ends_incomplete(
    oai: openai.AsyncOpenAI,
) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "input": "think then say", "max_output_tokens": 4}
    headers = {**FAST, "X-Demo-Reasoning-Tokens": "2"}
    # OpenAI ends a capped stream with response.incomplete, which the SDK's
    # responses.stream() helper does not accept as an ending: read the raw events.
    stream = await oai.responses.create(**body, stream=True, extra_headers=headers)
    events = [event async for event in stream]
    last = events[-1]
    assert last.type == "response.incomplete"
    final = last.response
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == "Echo: think"
    assert final.usage is not None
    assert final.usage.to_dict() == expected_usage("responses", body, headers)
    assert final.usage.output_tokens_details.reasoning_tokens == 2


async def test_responses_stream_cut_after_n_deltas(oai: openai.AsyncOpenAI) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "input": "one two three"}
    stream = await oai.responses.create(
        **body, stream=True, extra_headers={**FAST, "X-Demo-Cut-After": "1"}
    )
    events = []
    with pytest.raises(CUT_ERRORS):
        async for event in stream:
            events.append(event)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["Echo:"]
    assert events[-1].type == "response.output_text.delta"


# ---------------------------------------------------------------------- anthropic messages


def _messages(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": ANTHROPIC_MODEL,
        "max_tokens": 100,
        "system": "you echo",
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


async def test_messages_json_counts_cache_reads_and_writes_apart(
    claude: anthropic.AsyncAnthropic,
) -> None:
    body = _messages("please cache this long prompt")
    headers = {"X-Demo-Cached-Tokens": "3", "X-Demo-Cache-Write-Tokens": "2"}
    message = await claude.messages.create(**body, extra_headers=headers)
    assert message.type == "message" and message.role == "assistant"
    assert message.model == ANTHROPIC_MODEL and message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text == "Echo: please cache this long prompt"
    assert message.usage.to_dict() == expected_usage("messages", body, headers)
    # 2 + 5 words in: 3 read from the cache, 2 written to it, 2 uncached
    assert message.usage.input_tokens == 2
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.cache_creation_input_tokens == 2
    assert message.usage.output_tokens == 6


async def test_messages_max_tokens_stops_with_max_tokens(claude: anthropic.AsyncAnthropic) -> None:
    body = _messages("a b c", max_tokens=2)
    message = await claude.messages.create(**body)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and message.content[0].text == "Echo: a"
    assert message.usage.to_dict() == expected_usage("messages", body)


async def test_messages_without_max_tokens_is_400_in_anthropic_shape(port: int) -> None:
    body = {"model": ANTHROPIC_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/v1/messages", json=body) as response,
    ):
        assert response.status == 400
        error = await response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in error["error"]["message"]


async def test_messages_stream_event_sequence_and_usage(claude: anthropic.AsyncAnthropic) -> None:
    body = _messages("stream it now")
    headers = {**FAST, "X-Demo-Cached-Tokens": "1"}
    raw = await claude.messages.create(**body, stream=True, extra_headers=headers)
    events = [event async for event in raw]
    kinds = [e.type for e in events]
    deltas = expected_deltas("messages", body)
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * len(deltas),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK skips ping
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    usage = expected_usage("messages", body, headers)
    assert start.message.usage.to_dict() == {**usage, "output_tokens": 1}
    assert delta.usage.to_dict() == {"output_tokens": usage["output_tokens"]}
    assert delta.delta.stop_reason == "end_turn"

    async with claude.messages.stream(**body, extra_headers=headers) as stream:
        text = "".join([chunk async for chunk in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Echo: stream it now" == "".join(deltas)
    assert final.usage.to_dict() == usage


async def test_messages_stream_wire_has_ping_and_a_capped_stop_reason(port: int) -> None:
    body = _messages("a b c d", max_tokens=3, stream=True)
    url = f"http://127.0.0.1:{port}/v1/messages"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=FAST) as response,
    ):
        assert response.headers["Content-Type"].startswith("text/event-stream")
        wire = (await response.read()).decode()
    names = [line[len("event: ") :] for line in wire.splitlines() if line.startswith("event: ")]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert '"stop_reason":"max_tokens"' in wire
    assert '"usage":{"output_tokens":3}' in wire


async def test_messages_stream_cut_after_n_deltas(claude: anthropic.AsyncAnthropic) -> None:
    body = _messages("one two three")
    raw = await claude.messages.create(
        **body, stream=True, extra_headers={**FAST, "X-Demo-Cut-After": "3"}
    )
    events = []
    with pytest.raises(CUT_ERRORS):
        async for event in raw:
            events.append(event)
    texts = [
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    ]
    assert tuple(texts) == expected_deltas("messages", body)[:3]
    assert "message_delta" not in [e.type for e in events]
