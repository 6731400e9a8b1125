"""LlmMeter: an LLM answer's usage block, priced at its model's price to the micro-unit.

Bodies and streams have the providers' wire shapes (field names as in the ``openai`` and
``anthropic`` SDKs' types). Each is fed whole, byte by byte and in random slices; the
charge must equal genai-prices' own price for the answer's usage, and a stream cut short
is charged the documented estimate.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import zlib
from collections.abc import Iterator
from decimal import ROUND_HALF_UP
from typing import Any

import genai_prices
import pytest
from multidict import CIMultiDict

from gateway.config.model import LlmApi, ModelPriceOverride
from gateway.policies.cost import MAX_EVENT
from gateway.policies.llm import LlmMeter
from gateway.policies.llm_usage import CHARS_PER_TOKEN, LlmRequest, TokenUsage
from gateway.policies.prices import PriceBook, cost_micro

BOOK = PriceBook({})
JSON = "application/json"
SSE = "text/event-stream"


def request(model: str | None = None, body_bytes: int = 480, stream: bool = False) -> LlmRequest:
    return LlmRequest(
        model=model,
        stream=stream,
        max_output_tokens=None,
        body_bytes=body_bytes,
        usage_requested=False,
    )


def slicings(body: bytes) -> Iterator[list[bytes]]:
    """The body whole, byte by byte, and in random slices."""
    yield [body]
    yield [body[i : i + 1] for i in range(len(body))]
    rng = random.Random(len(body))
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, len(body)), min(12, len(body) - 1)))
        yield [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def metered(
    api: LlmApi,
    body: bytes,
    *,
    media: str = JSON,
    provider: str | None = None,
    req: LlmRequest | None = None,
    book: PriceBook = BOOK,
    encoding: str | None = None,
) -> list[LlmMeter]:
    """One finished meter per slicing of ``body``."""
    meters = []
    for pieces in slicings(body):
        meter = LlmMeter(api, book, provider, req or request())
        headers = CIMultiDict({"Content-Type": f"{media}; charset=utf-8"})
        if encoding:
            headers["Content-Encoding"] = encoding
        meter.see_headers(200, headers)
        for piece in pieces:
            meter.feed(piece)
        meter.result()
        meters.append(meter)
    return meters


def charged(api: LlmApi, body: bytes, **options: Any) -> tuple[int | None, TokenUsage | None]:
    """The charge and usage, the same for every slicing."""
    results = {(m.result(), m.usage, m.problem) for m in metered(api, body, **options)}
    assert len(results) == 1, results
    micro, usage, problem = results.pop()
    assert (micro is None) == (problem is not None), problem
    return micro, usage


def genai(usage: TokenUsage, provider: str | None) -> int:
    priced = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input,
            output_tokens=usage.output,
            cache_read_tokens=usage.cache_read,
            cache_write_tokens=usage.cache_write,
            output_reasoning_tokens=usage.reasoning,
        ),
        usage.model,
        provider_id=provider,
    )
    return rounded(priced.total_price)


def rounded(total: Any) -> int:
    return int((total * 1_000_000).to_integral_value(rounding=ROUND_HALF_UP))


def extracted(body: dict[str, Any], provider: str, flavor: str = "default") -> int:
    """genai-prices' price for a whole answer, from its own usage extractor."""
    return rounded(
        genai_prices.extract_usage(body, provider_id=provider, api_flavor=flavor)
        .calc_price()
        .total_price
    )


def sse(events: list[dict[str, Any]], *, named: bool = False, done: bool = False) -> bytes:
    lines = []
    for event in events:
        head = f"event: {event['type']}\n" if named else ""
        lines.append(f"{head}data: {json.dumps(event)}\n\n")
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


# --- OpenAI Chat Completions ---------------------------------------------------------

CHAT = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help?", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}


def test_a_chat_completion_costs_genai_prices_price_for_its_usage() -> None:
    micro, usage = charged("openai", json.dumps(CHAT).encode(), provider="openai")
    assert usage == TokenUsage("gpt-4o-mini-2024-07-18", 2006, 300, cache_read=1920)
    assert micro == genai(usage, "openai") == extracted(CHAT, "openai", "chat")
    # 86 fresh at 0.15, 1920 cached at 0.075, 300 out at 0.6: 12.9 + 144 + 180.
    assert micro == 337


def test_reasoning_tokens_are_read_and_priced_within_the_output() -> None:
    body = {
        **CHAT,
        "model": "o3-mini-2025-01-31",
        "usage": {
            "prompt_tokens": 5000,
            "completion_tokens": 2400,
            "total_tokens": 7400,
            "prompt_tokens_details": {"cached_tokens": 1024},
            "completion_tokens_details": {"reasoning_tokens": 1800},
        },
    }
    micro, usage = charged("openai", json.dumps(body).encode(), provider="openai")
    assert usage == TokenUsage("o3-mini-2025-01-31", 5000, 2400, 1024, reasoning=1800)
    assert micro == genai(usage, "openai") == extracted(body, "openai", "chat")


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


WORDS = ["Hello", "! How", " can I", " help", " you", " today", "? ", "Ünïcode ✓"]
CHAT_STREAM = [
    chat_chunk({"role": "assistant", "content": "", "refusal": None}),
    *(chat_chunk({"content": word}) for word in WORDS),
    chat_chunk({}, "stop"),
    {**chat_chunk({}), "choices": [], "usage": CHAT["usage"]},
]


def test_a_chat_stream_is_charged_from_its_last_chunks_usage() -> None:
    body = sse(CHAT_STREAM, done=True)
    micro, usage = charged("openai", body, media=SSE, provider="openai")
    assert usage == TokenUsage("gpt-4o-mini-2024-07-18", 2006, 300, cache_read=1920)
    assert micro == genai(usage, "openai") == 337


def test_usage_in_the_chunk_with_the_last_choice_is_final_at_done() -> None:
    last = {**chat_chunk({}, "stop"), "usage": CHAT["usage"]}
    body = sse([*CHAT_STREAM[:-2], last], done=True)
    micro, usage = charged("openai", body, media=SSE, provider="openai")
    assert usage is not None and not usage.estimated
    assert micro == 337


def test_a_chat_stream_cut_after_n_deltas_is_charged_the_estimate() -> None:
    """Cut before the usage chunk: the request body's bytes / 4 in, the delivered
    deltas' characters / 4 out, both rounded up."""
    req = request("gpt-4o-mini", body_bytes=1001, stream=True)
    for n in (0, 1, 3, len(WORDS)):
        body = sse(CHAT_STREAM[: 1 + n])
        micro, usage = charged("openai", body, media=SSE, provider="openai", req=req)
        chars = sum(len(word) for word in WORDS[:n])
        assert usage == TokenUsage(
            "gpt-4o-mini-2024-07-18",
            input=math.ceil(1001 / CHARS_PER_TOKEN),
            output=math.ceil(chars / CHARS_PER_TOKEN),
            estimated=True,
        )
        assert micro == genai(usage, "openai")


def test_a_cut_stream_counts_tool_call_arguments_and_reasoning_text() -> None:
    tool = {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    chunks = [
        chat_chunk({"role": "assistant", "reasoning_content": "Think: weather."}),  # 15
        chat_chunk(tool),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),  # 8
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),  # 9
    ]
    micro, usage = charged(
        "openai", sse(chunks), media=SSE, provider="openai", req=request(body_bytes=40)
    )
    assert usage == TokenUsage("gpt-4o-mini-2024-07-18", 10, math.ceil(32 / 4), estimated=True)
    assert micro == genai(usage, "openai")


def test_a_completions_answer_and_stream() -> None:
    body = {
        "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
        "object": "text_completion",
        "created": 1589478378,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {"text": "\n\nThis is a test", "index": 0, "logprobs": None, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    micro, usage = charged("openai", json.dumps(body).encode(), provider="openai")
    assert usage == TokenUsage("gpt-3.5-turbo-instruct", 5, 7)
    assert micro == genai(usage, "openai") == extracted(body, "openai", "chat")
    stream = [
        {
            **body,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}],
            "usage": None,
        }
        for text in ("\n\nThis", " is a", " test")
    ]
    cut_micro, cut = charged(
        "openai", sse(stream), media=SSE, provider="openai", req=request(body_bytes=20)
    )
    assert cut == TokenUsage("gpt-3.5-turbo-instruct", 5, math.ceil(15 / 4), estimated=True)
    assert cut_micro == genai(cut, "openai")


def test_an_embeddings_answer_costs_its_prompt_tokens() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8191, "total_tokens": 8191},
    }
    micro, usage = charged("openai", json.dumps(body).encode(), provider="openai")
    assert usage == TokenUsage("text-embedding-3-small", 8191, 0)
    assert micro == genai(usage, "openai")
    assert micro == 164  # 8191 * 0.02 = 163.82


# --- OpenAI Responses ----------------------------------------------------------------

RESPONSE_USAGE = {
    "input_tokens": 3200,
    "input_tokens_details": {"cached_tokens": 2048},
    "output_tokens": 900,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 4100,
}
RESPONSE = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "error": None,
    "model": "o3-mini-2025-01-31",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "In a peaceful grove...", "annotations": []}
            ],
        }
    ],
    "usage": RESPONSE_USAGE,
}


def test_a_responses_answer() -> None:
    micro, usage = charged("openai", json.dumps(RESPONSE).encode(), provider="openai")
    assert usage == TokenUsage("o3-mini-2025-01-31", 3200, 900, cache_read=2048, reasoning=512)
    assert micro == genai(usage, "openai") == extracted(RESPONSE, "openai", "responses")


def responses_stream(deltas: list[str], *, completed: bool) -> list[dict[str, Any]]:
    started = {**RESPONSE, "status": "in_progress", "output": [], "usage": None}
    item = {
        "id": "msg_1",
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": 0, "response": started},
        {"type": "response.in_progress", "sequence_number": 1, "response": started},
        {
            "type": "response.output_item.added",
            "sequence_number": 2,
            "output_index": 0,
            "item": item,
        },
        {
            "type": "response.content_part.added",
            "sequence_number": 3,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
    ]
    for number, delta in enumerate(deltas):
        events.append(
            {
                "type": "response.output_text.delta",
                "sequence_number": 4 + number,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": delta,
                "logprobs": [],
            }
        )
    if completed:
        events.append(
            {
                "type": "response.output_text.done",
                "sequence_number": 90,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "text": "".join(deltas),
                "logprobs": [],
            }
        )
        events.append({"type": "response.completed", "sequence_number": 91, "response": RESPONSE})
    return events


def test_a_responses_stream_is_charged_from_response_completed() -> None:
    body = sse(responses_stream(["In a", " peaceful", " grove"], completed=True), named=True)
    micro, usage = charged("openai", body, media=SSE, provider="openai")
    assert usage == TokenUsage("o3-mini-2025-01-31", 3200, 900, cache_read=2048, reasoning=512)
    assert micro == genai(usage, "openai")


def test_a_responses_stream_cut_short_is_estimated() -> None:
    deltas = ["In a", " peaceful", " grove", " beneath"]
    body = sse(responses_stream(deltas[:3], completed=False), named=True)
    micro, usage = charged(
        "openai", body, media=SSE, provider="openai", req=request(body_bytes=333)
    )
    assert usage == TokenUsage("o3-mini-2025-01-31", 84, math.ceil(18 / 4), estimated=True)
    assert micro == genai(usage, "openai")


# --- Anthropic Messages ----------------------------------------------------------------

MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-haiku-20241022",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 800,
        "cache_creation_input_tokens": 700,
        "cache_read_input_tokens": 1500,
        "cache_creation": {"ephemeral_5m_input_tokens": 700, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 450,
        "service_tier": "standard",
    },
}


def test_an_anthropic_message_totals_fresh_cached_and_written_input() -> None:
    micro, usage = charged("anthropic", json.dumps(MESSAGE).encode(), provider="anthropic")
    assert usage == TokenUsage(
        "claude-3-5-haiku-20241022", 3000, 450, cache_read=1500, cache_write=700
    )
    assert micro == genai(usage, "anthropic") == extracted(MESSAGE, "anthropic")
    # 800 at 0.8 + 1500 at 0.08 + 700 at 1 + 450 at 4 = 640 + 120 + 700 + 1800.
    assert micro == 3260


def anthropic_stream(texts: list[str], *, model: str, finished: bool) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": model,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 25,
                    "cache_creation_input_tokens": 2051,
                    "cache_read_input_tokens": 4096,
                    "output_tokens": 1,
                },
            },
        },
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "Let me see."},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "ping"},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    ]
    for text in texts:
        events.append(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "text_delta", "text": text},
            }
        )
    if finished:
        events += [
            {"type": "content_block_stop", "index": 1},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 503},
            },
            {"type": "message_stop"},
        ]
    return events


def test_an_anthropic_stream_is_charged_from_its_start_and_delta_usage() -> None:
    for model in ("claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"):
        body = sse(anthropic_stream(["Hello", " world"], model=model, finished=True), named=True)
        micro, usage = charged("anthropic", body, media=SSE, provider="anthropic")
        assert usage == TokenUsage(model, 6172, 503, cache_read=4096, cache_write=2051)
        assert micro == genai(usage, "anthropic")


def test_an_anthropic_stream_cut_after_n_deltas_uses_the_providers_input() -> None:
    texts = ["Hello", " world", ", how", " are you"]
    for n in (0, 2, 4):
        events = anthropic_stream(texts[:n], model="claude-sonnet-4-20250514", finished=False)
        micro, usage = charged(
            "anthropic",
            sse(events, named=True),
            media=SSE,
            provider="anthropic",
            req=request(body_bytes=99_999),
        )
        chars = len("Let me see.") + sum(len(text) for text in texts[:n])
        assert usage == TokenUsage(
            "claude-sonnet-4-20250514", 6172, math.ceil(chars / 4), 4096, 2051, estimated=True
        )
        assert micro == genai(usage, "anthropic")


def test_an_anthropic_stream_cut_after_its_message_delta_uses_the_running_usage() -> None:
    events = anthropic_stream(["Hi"], model="claude-sonnet-4-20250514", finished=True)[:-1]
    micro, usage = charged("anthropic", sse(events, named=True), media=SSE, provider="anthropic")
    assert usage == TokenUsage("claude-sonnet-4-20250514", 6172, 503, 4096, 2051, estimated=True)
    assert micro == genai(usage, "anthropic")


# --- Prices, models and what the meter cannot charge -----------------------------------


def test_an_override_wins_over_the_catalogue() -> None:
    book = PriceBook(
        {
            "gpt-4o-mini-2024-07-18": ModelPriceOverride(
                input_mtok=0.5, output_mtok=1.5, cache_read_mtok=0.25
            )
        }
    )
    micro, usage = charged("openai", json.dumps(CHAT).encode(), provider="openai", book=book)
    # 86 fresh at 0.5 + 1920 cached at 0.25 + 300 out at 1.5 = 43 + 480 + 450.
    assert micro == 973
    assert usage is not None
    assert micro != genai(usage, "openai")


def test_an_unpriced_model_is_no_charge_and_names_the_model() -> None:
    body = {**CHAT, "model": "my-own-llama-70b"}
    meters = metered("openai", json.dumps(body).encode(), provider="openai")
    for meter in meters:
        assert meter.result() is None
        assert meter.problem == "model my-own-llama-70b has no price"
        assert meter.usage == TokenUsage("my-own-llama-70b", 2006, 300, cache_read=1920)


def test_the_requests_model_counts_when_the_answer_names_none() -> None:
    body = {key: value for key, value in CHAT.items() if key != "model"}
    micro, usage = charged(
        "openai", json.dumps(body).encode(), provider="openai", req=request("gpt-4o-mini")
    )
    assert usage is not None and usage.model == "gpt-4o-mini"
    assert micro == 337


def test_a_whole_answer_without_usage_is_no_charge() -> None:
    body = {key: value for key, value in CHAT.items() if key != "usage"}
    for meter in metered("openai", json.dumps(body).encode(), provider="openai"):
        assert meter.result() is None
        assert meter.problem == "the response carried no usage"
        assert meter.usage is None
    for meter in metered("openai", b'{"model": "gpt-4o-mini", "usage": nul', provider="openai"):
        assert meter.result() is None
        assert meter.problem == "the body is not JSON"


def test_gzip_and_deflate_bodies_are_inflated() -> None:
    body = json.dumps(CHAT).encode()
    micro, _ = charged("openai", gzip.compress(body), provider="openai", encoding="gzip")
    assert micro == 337
    micro, _ = charged("openai", zlib.compress(body), provider="openai", encoding="deflate")
    assert micro == 337
    stream = gzip.compress(
        sse(anthropic_stream(["Hi"], model="claude-sonnet-4-20250514", finished=True), named=True)
    )
    micro, usage = charged("anthropic", stream, media=SSE, provider="anthropic", encoding="gzip")
    assert usage is not None and not usage.estimated
    assert micro == genai(usage, "anthropic")


def test_an_oversized_event_is_skipped_and_the_usage_still_read() -> None:
    huge = chat_chunk({"content": "x" * (MAX_EVENT + 10)})
    body = sse([CHAT_STREAM[0], huge, *CHAT_STREAM[1:]], done=True)
    meter = LlmMeter("openai", BOOK, "openai", request())
    meter.see_headers(200, CIMultiDict({"Content-Type": SSE}))
    for start in range(0, len(body), 65_536):
        meter.feed(body[start : start + 65_536])
    assert meter.result() == 337
    assert meter.usage is not None and not meter.usage.estimated


def test_the_charge_is_the_books_cost_for_the_usage() -> None:
    """What the proxy settles equals PriceBook.cost_micro of the usage it records."""
    micro, usage = charged("openai", json.dumps(RESPONSE).encode(), provider="openai")
    price = BOOK.price_of("o3-mini-2025-01-31", "openai")
    assert price is not None and usage is not None
    assert micro == cost_micro(price, usage) == BOOK.cost_micro(price, usage)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_an_empty_stream_is_estimated_from_the_request(api: LlmApi) -> None:
    meter = LlmMeter(api, BOOK, None, request("claude-sonnet-4-20250514", body_bytes=7))
    meter.see_headers(200, CIMultiDict({"Content-Type": SSE}))
    assert meter.result() == genai(
        TokenUsage("claude-sonnet-4-20250514", 2, 0, estimated=True), None
    )
    assert meter.usage == TokenUsage("claude-sonnet-4-20250514", 2, 0, estimated=True)
