"""LLM routes through keygate with the official SDKs: each answer is charged genai-prices'
price for its usage to the micro-unit, streams carry usage the client did not ask for
(and never see it), cut streams are charged what was delivered, unpriced models are
refused, overrides win, and ``reserve: auto`` holds a cap under concurrency.

The oracle for a charge is genai-prices itself: ``extract_usage`` on the usage block the
sample upstream sent, then ``calc_price``, rounded half up to the micro-unit.
"""

from __future__ import annotations

import asyncio
import json
import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from genai_prices import Usage, calc_price, extract_usage
from redis.asyncio import Redis

from gateway.store.keystore import Issued
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, StartGateway

LLM_ROUTES: list[dict[str, Any]] = [
    {
        "name": "openai",
        "prefix": "/openai",
        "upstream": "demo",
        "strip_prefix": True,
        "scopes": ["llm:use"],
        "cost": {"llm": "openai", "provider": "openai"},
        "reserve": "auto",
        "max_output_tokens": 256,
        "error_format": "openai",
    },
    {
        "name": "anthropic",
        "prefix": "/anthropic",
        "upstream": "demo",
        "strip_prefix": True,
        "scopes": ["llm:use"],
        "cost": {"llm": "anthropic", "provider": "anthropic"},
        "reserve": "auto",
        "error_format": "anthropic",
    },
    {
        "name": "remaining",
        "prefix": "/remaining",
        "upstream": "demo",
        "strip_prefix": True,
        "scopes": ["llm:use"],
        "cost": {"llm": "openai", "provider": "openai"},
        "reserve": "auto",
        "reserve_mode": "remaining",
        "error_format": "openai",
    },
]
HI = [{"role": "user", "content": "alpha beta gamma"}]


def micro(price: Decimal) -> int:
    return int((price * 1_000_000).to_integral_value(rounding=ROUND_HALF_UP))


def oracle(body: dict[str, Any], provider: str, flavor: str = "chat") -> int:
    """genai-prices' price of a response body's usage, in micro-units."""
    extracted = (
        extract_usage(body, provider_id=provider, api_flavor=flavor)
        if provider == "openai"
        else extract_usage(body, provider_id=provider)
    )
    return micro(calc_price(extracted.usage, body["model"], provider_id=provider).total_price)


async def llm_gateway(start_gateway: StartGateway, **sections: Any) -> Gateway:
    return await start_gateway(routes=LLM_ROUTES, **sections)


async def charged(gw: Gateway, redis: Redis, key_prefix: str, issued: Issued) -> int:
    """The key's usage over all time, once every settlement is written."""
    await gw.proxy.settlements.drain()
    return int(await redis.get(f"{key_prefix}u:{{{issued.record.id}}}:t") or 0)


@pytest.fixture
async def llm_key(make_key: MakeKey) -> Issued:
    return await make_key(scopes=["llm:use"])


async def test_openai_sdk_chat_is_charged_genai_prices_price_to_the_micro_unit(
    start_gateway: StartGateway, llm_key: Issued, redis: Redis, key_prefix: str
) -> None:
    gw = await llm_gateway(start_gateway)
    client = openai.AsyncOpenAI(
        base_url=f"{gw.url}/openai/v1", api_key=llm_key.secret, max_retries=0
    )
    async with client:
        answer = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,  # type: ignore[arg-type]
            extra_headers={"X-Demo-Cached-Tokens": "2"},
        )
    body = answer.model_dump()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    expected = oracle(body, "openai")
    assert expected > 0
    assert await charged(gw, redis, key_prefix, llm_key) == expected


async def test_an_openai_stream_gets_usage_upstream_and_the_client_sees_none_of_it(
    start_gateway: StartGateway, llm_key: Issued, redis: Redis, key_prefix: str
) -> None:
    gw = await llm_gateway(start_gateway)
    client = openai.AsyncOpenAI(
        base_url=f"{gw.url}/openai/v1", api_key=llm_key.secret, max_retries=0
    )
    async with client:
        # The same request, not streamed: its usage is what the stream's must be.
        whole = await client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
        before = await charged(gw, redis, key_prefix, llm_key)
        assert before == oracle(whole.model_dump(), "openai")
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=HI,  # type: ignore[arg-type]
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk reached the client
    assert all(chunk.usage is None for chunk in chunks)
    assert await charged(gw, redis, key_prefix, llm_key) == 2 * before


async def test_the_stream_as_sent_has_no_usage_member_the_client_did_not_ask_for(
    start_gateway: StartGateway, llm_key: Issued, http: aiohttp.ClientSession
) -> None:
    gw = await llm_gateway(start_gateway)
    body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    async with http.post(
        f"{gw.url}/openai/v1/chat/completions", json=body, headers=bearer(llm_key.secret)
    ) as response:
        assert response.status == 200
        raw = await response.read()
    assert b'"usage"' not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    # A client that asked for usage gets it, untouched.
    body["stream_options"] = {"include_usage": True}
    async with http.post(
        f"{gw.url}/openai/v1/chat/completions", json=body, headers=bearer(llm_key.secret)
    ) as response:
        raw = await response.read()
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == 3


async def test_anthropic_sdk_messages_json_and_stream_are_charged_their_price(
    start_gateway: StartGateway, llm_key: Issued, redis: Redis, key_prefix: str
) -> None:
    gw = await llm_gateway(start_gateway)
    client = anthropic.AsyncAnthropic(
        base_url=f"{gw.url}/anthropic", api_key=llm_key.secret, max_retries=0
    )
    async with client:
        message = await client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=100,
            messages=HI,  # type: ignore[arg-type]
            extra_headers={"X-Demo-Cached-Tokens": "1", "X-Demo-Cache-Write-Tokens": "1"},
        )
        one = oracle(message.model_dump(), "anthropic")
        assert one > 0
        assert await charged(gw, redis, key_prefix, llm_key) == one
        async with client.messages.stream(
            model="claude-3-5-haiku-latest",
            max_tokens=100,
            messages=HI,  # type: ignore[arg-type]
            extra_headers={"X-Demo-Cached-Tokens": "1", "X-Demo-Cache-Write-Tokens": "1"},
        ) as stream:
            final = await stream.get_final_message()
    assert final.content[0].text == message.content[0].text  # type: ignore[union-attr]
    assert await charged(gw, redis, key_prefix, llm_key) == 2 * one


async def test_responses_and_embeddings_are_charged_their_price(
    start_gateway: StartGateway, llm_key: Issued, redis: Redis, key_prefix: str
) -> None:
    gw = await llm_gateway(start_gateway)
    client = openai.AsyncOpenAI(
        base_url=f"{gw.url}/openai/v1", api_key=llm_key.secret, max_retries=0
    )
    async with client:
        response = await client.responses.create(
            model="gpt-4o-mini", input="alpha beta gamma", max_output_tokens=50
        )
        first = oracle(response.model_dump(), "openai", "responses")
        assert await charged(gw, redis, key_prefix, llm_key) == first
        stream = await client.responses.create(
            model="gpt-4o-mini", input="alpha beta gamma", max_output_tokens=50, stream=True
        )
        kinds = [event.type async for event in stream]
        assert kinds[-1] == "response.completed"
        assert await charged(gw, redis, key_prefix, llm_key) == 2 * first
        embedded = await client.embeddings.create(
            model="text-embedding-3-small",
            input="word " * 400,  # 8 micro-units at $0.02/M
        )
    body = {"model": "text-embedding-3-small", "usage": embedded.usage.model_dump()}
    third = oracle(body, "openai", "embeddings")
    assert third > 0
    assert await charged(gw, redis, key_prefix, llm_key) == 2 * first + third


async def test_a_stream_cut_after_three_deltas_is_charged_what_was_delivered(
    start_gateway: StartGateway,
    llm_key: Issued,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = await llm_gateway(start_gateway)
    words = "one two three four five six"
    raw = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}], "stream": True}
    ).encode()
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            f"{gw.url}/openai/v1/chat/completions",
            data=raw,
            headers={
                **bearer(llm_key.secret),
                "X-Demo-Cut-After": "3",
                "Content-Type": "application/json",
            },
        ) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                got += chunk
    events = [json.loads(line[6:]) for line in got.split(b"\n") if line.startswith(b"data: {")]
    delivered = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert delivered == "Echo: one two"  # the first three deltas: "Echo:", " one", " two"
    # Input from the body's size, output from the delivered characters (4 per token).
    usage = Usage(input_tokens=math.ceil(len(raw) / 4), output_tokens=math.ceil(len(delivered) / 4))
    expected = micro(calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price)
    assert await charged(gw, redis, key_prefix, llm_key) == expected


async def test_an_unpriced_model_is_refused_before_forwarding(
    start_gateway: StartGateway, llm_key: Issued, redis: Redis, key_prefix: str, upstream: Any
) -> None:
    gw = await llm_gateway(start_gateway)
    client = openai.AsyncOpenAI(
        base_url=f"{gw.url}/openai/v1", api_key=llm_key.secret, max_retries=0
    )
    hits = len(upstream.hits)
    async with client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="house-model-7b", messages=HI)  # type: ignore[arg-type]
    assert refused.value.status_code == 403
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "unpriced_model"
    assert "house-model-7b" in error["message"]
    assert len(upstream.hits) == hits  # never forwarded
    assert await charged(gw, redis, key_prefix, llm_key) == 0


async def test_a_price_override_in_config_wins_over_the_catalogue(
    start_gateway: StartGateway, llm_key: Issued, redis: Redis, key_prefix: str
) -> None:
    prices = {"gpt-4o-mini": {"input_mtok": 1000, "output_mtok": 2000, "cache_read_mtok": 500}}
    gw = await llm_gateway(start_gateway, prices=prices)
    client = openai.AsyncOpenAI(
        base_url=f"{gw.url}/openai/v1", api_key=llm_key.secret, max_retries=0
    )
    async with client:
        answer = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,  # type: ignore[arg-type]
            extra_headers={"X-Demo-Cached-Tokens": "1"},
        )
    assert answer.usage is not None
    inputs, outputs = answer.usage.prompt_tokens, answer.usage.completion_tokens
    # (3 - 1) x 1000 + 1 x 500 + 4 x 2000 credits per million tokens
    expected = micro(Decimal((inputs - 1) * 1000 + 500 + outputs * 2000) / 1_000_000)
    assert (inputs, outputs, expected) == (3, 4, 10_500)
    assert await charged(gw, redis, key_prefix, llm_key) == expected


async def test_reserve_auto_worst_case_never_passes_a_cap_under_200_concurrent_requests(
    start_gateway: StartGateway,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = await llm_gateway(start_gateway)
    body = {"model": "gpt-4o", "messages": HI, "max_tokens": 20}
    raw = json.dumps(body).encode()
    # The worst case of this request: every body byte an input token, 20 output tokens.
    worst = micro(
        calc_price(
            Usage(input_tokens=len(raw), output_tokens=20), "gpt-4o", provider_id="openai"
        ).total_price
    )
    cap = 10 * worst + worst // 2  # room for exactly 10 worst cases at once
    issued = await make_key(scopes=["llm:use"], limit_micro=cap, limit_reset="daily")

    async def one() -> int:
        async with http.post(
            f"{gw.url}/openai/v1/chat/completions",
            data=raw,
            headers={**bearer(issued.secret), "Content-Type": "application/json"},
        ) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    spent = await charged(gw, redis, key_prefix, issued)
    oks = statuses.count(200)
    assert set(statuses) == {200, 402}
    assert oks >= 10  # at least the first ten fit whole
    assert spent <= cap
    each = oracle(
        {"model": "gpt-4o", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "openai"
    )
    assert spent == oks * each


async def test_remaining_mode_admits_while_room_is_left_where_worst_case_refuses(
    start_gateway: StartGateway, make_key: MakeKey, redis: Redis, key_prefix: str
) -> None:
    gw = await llm_gateway(start_gateway)
    raw = {"model": "gpt-4o", "messages": HI, "max_tokens": 100_000}
    # A cap far below this request's worst case, but above its actual cost.
    issued = await make_key(scopes=["llm:use"], limit_micro=200, limit_reset="daily")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gw.url}/openai/v1/chat/completions", json=raw, headers=bearer(issued.secret)
        ) as refused:
            assert refused.status == 402
            error = (await refused.json())["error"]
            assert error["code"] == "spend_limited"
        async with http.post(
            f"{gw.url}/remaining/v1/chat/completions", json=raw, headers=bearer(issued.secret)
        ) as admitted:
            assert admitted.status == 200
            usage = (await admitted.json())["usage"]
    expected = oracle({"model": "gpt-4o", "usage": usage}, "openai")
    assert 0 < expected <= 200
    assert await charged(gw, redis, key_prefix, issued) == expected


async def test_tokens_are_counted_in_prometheus_by_route_model_and_kind(
    start_gateway: StartGateway, llm_key: Issued, http: aiohttp.ClientSession
) -> None:
    gw = await llm_gateway(start_gateway)
    body = {"model": "gpt-4o-mini", "messages": HI}
    async with http.post(
        f"{gw.url}/openai/v1/chat/completions",
        json=body,
        headers={**bearer(llm_key.secret), "X-Demo-Cached-Tokens": "2"},
    ) as response:
        assert response.status == 200
    text = gw.proxy.metrics.exposition().decode()
    assert 'keygate_tokens_total{kind="input",model="gpt-4o-mini",route="openai"} 3.0' in text
    assert 'keygate_tokens_total{kind="output",model="gpt-4o-mini",route="openai"} 4.0' in text
    assert 'keygate_tokens_total{kind="cache_read",model="gpt-4o-mini",route="openai"} 2.0' in text


async def test_an_answer_the_api_refused_is_not_charged_its_reservation(
    start_gateway: StartGateway,
    llm_key: Issued,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = await llm_gateway(start_gateway)
    # No messages: keygate forwards it (the model is priced), the API answers 400.
    async with http.post(
        f"{gw.url}/openai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "max_tokens": 100},
        headers=bearer(llm_key.secret),
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert await charged(gw, redis, key_prefix, llm_key) == 0


async def test_an_anthropic_route_refuses_in_anthropics_error_shape(
    start_gateway: StartGateway, llm_key: Issued
) -> None:
    gw = await llm_gateway(start_gateway)
    client = anthropic.AsyncAnthropic(
        base_url=f"{gw.url}/anthropic", api_key=llm_key.secret, max_retries=0
    )
    async with client:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await client.messages.create(
                model="house-model-7b",
                max_tokens=10,
                messages=HI,  # type: ignore[arg-type]
            )
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    assert body["error"]["code"] == "unpriced_model"
    assert "house-model-7b" in body["error"]["message"]


TIGHT_LLM = {
    "name": "tight-llm",
    "prefix": "/tight-llm",
    "upstream": "tight",  # read timeout 0.3 s
    "strip_prefix": True,
    "cost": {"llm": "openai", "provider": "openai"},
    "reserve": "auto",
    "max_output_tokens": 256,
}


def estimate(body: bytes, delivered: str) -> int:
    """A cut stream's charge: input from the body's size, output from the delivered text."""
    usage = Usage(
        input_tokens=math.ceil(len(body) / 4), output_tokens=math.ceil(len(delivered) / 4)
    )
    return micro(calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price)


async def test_a_stream_whose_client_left_is_charged_what_was_delivered(
    start_gateway: StartGateway,
    llm_key: Issued,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = await llm_gateway(start_gateway)
    words = "one two three four five six"
    raw = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}], "stream": True}
    ).encode()
    seen = ""
    headers = {**bearer(llm_key.secret), "X-Demo-Delay": "0.3", "Content-Type": "application/json"}
    async with http.post(
        f"{gw.url}/openai/v1/chat/completions", data=raw, headers=headers
    ) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                seen += delta.get("content") or ""
            if seen == "Echo: one":
                break  # and leave: the connection closes with the response
    charged = await charged_when_settled(gw, redis, key_prefix, llm_key)
    # What was written before keygate saw the client go: these two deltas, perhaps the next.
    assert charged in (estimate(raw, "Echo: one"), estimate(raw, "Echo: one two"))


async def test_a_stream_cut_by_the_read_timeout_is_charged_what_was_delivered(
    start_gateway: StartGateway,
    llm_key: Issued,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(routes=[*LLM_ROUTES, TIGHT_LLM])
    raw = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "one two"}],
            "stream": True,
        }
    ).encode()
    headers = {**bearer(llm_key.secret), "X-Demo-Delay": "2", "Content-Type": "application/json"}
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            f"{gw.url}/tight-llm/v1/chat/completions", data=raw, headers=headers
        ) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                got += chunk
    assert b'"content":"Echo:"' in got and b" one" not in got
    assert await charged_when_settled(gw, redis, key_prefix, llm_key) == estimate(raw, "Echo:")


async def charged_when_settled(gw: Gateway, redis: Redis, key_prefix: str, issued: Issued) -> int:
    """The key's usage once the request that was cut has been settled (its handler ends a
    moment after the client sees the end)."""
    for _ in range(100):
        await gw.proxy.settlements.drain()
        in_flight = await redis.hlen(f"{key_prefix}le:{{{issued.record.id}}}")
        if not in_flight:
            break
        await asyncio.sleep(0.05)
    return await charged(gw, redis, key_prefix, issued)
