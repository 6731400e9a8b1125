"""Usage by model through the whole proxy: LLM answers (the official openai SDK, streamed
and not, against the demo upstream's known usage blocks) are settled with their token
usage, and ``GET /v1/key`` shows each model's cost, tokens and requests; a route without
token usage adds no model."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
from redis.asyncio import Redis

from gateway.store.keystore import Issued
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import COST_ROUTES, StartGateway

ROUTES: list[dict[str, Any]] = [
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
]
HI = [{"role": "user", "content": "alpha beta gamma"}]


async def _own_key(http: aiohttp.ClientSession, url: str, secret: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/key", headers=bearer(secret)) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
    data: dict[str, Any] = body["data"]
    return data


async def test_get_v1_key_shows_each_models_cost_tokens_and_requests(
    start_gateway: StartGateway,
    make_key: MakeKey,
    http: aiohttp.ClientSession,
    redis: Redis,
    key_prefix: str,
) -> None:
    gw = await start_gateway(routes=ROUTES)
    issued: Issued = await make_key(scopes=["llm:use"])
    assert issued.secret is not None
    client = openai.AsyncOpenAI(
        base_url=f"{gw.url}/openai/v1", api_key=issued.secret, max_retries=0
    )
    async with client:
        whole = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,  # type: ignore[arg-type]
            stream=True,
        )
        async for _chunk in stream:  # type: ignore[union-attr]
            pass
        other = await client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    await gw.proxy.settlements.drain()
    assert whole.usage is not None and other.usage is not None

    data = await _own_key(http, gw.url, issued.secret)
    total = int(await redis.get(f"{key_prefix}u:{{{issued.record.id}}}:t") or 0)
    for period in ("daily", "weekly", "monthly"):
        models = data["usage_by_model"][period]
        assert set(models) == {"gpt-4o-mini", "gpt-4o"}
        mini, large = models["gpt-4o-mini"], models["gpt-4o"]
        assert mini["requests"] == 2 and large["requests"] == 1
        assert mini["input_tokens"] == 2 * whole.usage.prompt_tokens
        assert mini["output_tokens"] == 2 * whole.usage.completion_tokens
        assert large["input_tokens"] == other.usage.prompt_tokens
        assert large["output_tokens"] == other.usage.completion_tokens
        # The models' costs add up to what the key was charged, to the micro-unit.
        assert round((mini["cost"] + large["cost"]) * 1_000_000) == total
    assert data["usage"] == total / 1_000_000


async def test_a_route_without_token_usage_adds_no_model(
    start_gateway: StartGateway, make_key: MakeKey, http: aiohttp.ClientSession
) -> None:
    fixed = next(route for route in COST_ROUTES if route["name"] == "fixed")
    gw = await start_gateway(routes=[{**fixed, "upstream": "demo", "rewrite": "/echo/x"}])
    issued = await make_key()
    assert issued.secret is not None
    async with http.get(f"{gw.url}/c/fixed", headers=bearer(issued.secret)) as response:
        assert response.status == 200
    await gw.proxy.settlements.drain()
    data = await _own_key(http, gw.url, issued.secret)
    assert data["usage"] == 0.25
    assert data["usage_by_model"] == {"daily": {}, "weekly": {}, "monthly": {}}
