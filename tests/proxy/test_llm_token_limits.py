"""Token limits per key (``token_limits``): input plus output tokens per window, decided
in the authorize script (the estimate reserved), trued up to the usage at settlement,
exact across replicas; 429 ``token_rate_limited`` with the draft's headers for the token
policy."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from redis.asyncio import Redis

from gateway.store.record import TokenLimitSpec
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, StartGateway
from tests.proxy.test_llm_metering import LLM_ROUTES

HI = [{"role": "user", "content": "alpha beta gamma"}]
BODY = json.dumps({"model": "gpt-4o-mini", "messages": HI, "max_tokens": 20}).encode()
ESTIMATE = len(BODY) + 20  # every body byte an input token, plus the output bound
ACTUAL = 3 + 4  # the sample upstream's usage: 3 words in, "Echo: alpha beta gamma" out


async def post(http: aiohttp.ClientSession, gw: Gateway, secret: str) -> aiohttp.ClientResponse:
    async with http.post(
        f"{gw.url}/openai/v1/chat/completions",
        data=BODY,
        headers={**bearer(secret), "Content-Type": "application/json"},
    ) as response:
        await response.read()
        return response


async def window_used(redis: Redis, key_prefix: str, key_id: str) -> int:
    return int(await redis.hget(f"{key_prefix}k:{{{key_id}}}", "tk_u1") or 0)


async def test_the_settlement_trues_the_estimate_up_to_the_tokens_used(
    start_gateway: StartGateway,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(routes=LLM_ROUTES)
    limit = 2 * ESTIMATE - 1  # one estimate fits; two at once do not
    issued = await make_key(scopes=["llm:use"], token_limits=(TokenLimitSpec(limit, 3600),))
    admitted = 0
    while True:
        response = await post(http, gw, issued.secret)
        await gw.proxy.settlements.drain()
        if response.status != 200:
            break
        admitted += 1
        # Settled: the window holds what the answers used, not their estimates.
        assert await window_used(redis, key_prefix, issued.record.id) == admitted * ACTUAL
    # Admitted while what was used plus one more estimate fits the limit.
    assert admitted == (limit - ESTIMATE) // ACTUAL + 1
    assert response.status == 429
    assert response.headers["RateLimit-Policy"] == f'"tokens";q={limit};w=3600'
    left = limit - admitted * ACTUAL
    assert response.headers["RateLimit"].startswith(f'"tokens";r={left};t=')
    assert int(response.headers["Retry-After"]) >= 1


async def test_a_request_bigger_than_the_limit_is_told_so(
    start_gateway: StartGateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(routes=LLM_ROUTES)
    issued = await make_key(scopes=["llm:use"], token_limits=(TokenLimitSpec(10, 60),))
    async with http.post(
        f"{gw.url}/openai/v1/chat/completions", data=BODY, headers=bearer(issued.secret)
    ) as response:
        assert response.status == 429
        error: dict[str, Any] = (await response.json())["error"]
    assert error["code"] == "token_rate_limited"
    assert f"up to {ESTIMATE} tokens" in error["message"]
    assert error["token_limit"] == {
        "tokens": 10,
        "period_seconds": 60.0,
        "used": 0,
        "requested": ESTIMATE,
    }


async def test_token_limits_hold_across_two_replicas(
    start_gateway: StartGateway,
    make_key: MakeKey,
    redis: Redis,
    key_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    first = await start_gateway(routes=LLM_ROUTES)
    second = await start_gateway(routes=LLM_ROUTES)
    limit = 5 * ESTIMATE  # five estimates at once; more once answers settle
    issued = await make_key(scopes=["llm:use"], token_limits=(TokenLimitSpec(limit, 3600),))
    responses = await asyncio.gather(
        *(post(http, (first, second)[i % 2], issued.secret) for i in range(120))
    )
    await first.proxy.settlements.drain()
    await second.proxy.settlements.drain()
    statuses = [r.status for r in responses]
    oks = statuses.count(200)
    assert set(statuses) == {200, 429}
    used = await window_used(redis, key_prefix, issued.record.id)
    assert used == oks * ACTUAL
    assert used <= limit
    # Every refusal was for want of room: what was used plus one estimate passed the limit.
    assert oks >= 5


async def test_a_route_that_is_not_an_llm_route_counts_no_tokens(
    start_gateway: StartGateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(routes=LLM_ROUTES)
    issued = await make_key(scopes=["echo:read"], token_limits=(TokenLimitSpec(1, 60),))
    for _ in range(3):
        async with http.get(f"{gw.url}/echo/x", headers=bearer(issued.secret)) as response:
            assert response.status == 200
