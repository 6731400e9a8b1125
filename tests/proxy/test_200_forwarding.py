"""200: a request with a valid key reaches its upstream as sent, through every credential
source, and the official OpenAI SDK works through the gateway with a gateway key."""

from __future__ import annotations

import asyncio
import gzip
import hashlib

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.store.keystore import KeyStore
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (
    ECHO_SCOPES,
    Gateway,
    ServeApp,
    StartGateway,
    Upstream,
    echoed,
)


async def test_a_valid_key_reaches_the_upstream_with_method_path_query_and_body(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES, workspace_id="ws-200")
    payload = b'{"hello": "upstream", "n": [1, 2, 3]}'
    response = await http.put(
        f"{gateway.url}/echo/items/7?verbose=1&tag=a&tag=b",
        data=payload,
        headers={**bearer(issued.secret), "Content-Type": "application/json"},
    )
    echo = await echoed(response)
    assert echo["method"] == "PUT"
    assert echo["path"] == "/echo/items/7"
    assert echo["query"] == {"verbose": "1", "tag": ["a", "b"]}
    assert echo["body"] == payload.decode() and echo["body_bytes"] == len(payload)
    assert echo["sha256"] == hashlib.sha256(payload).hexdigest()
    assert echo["headers"]["Content-Type"] == "application/json"
    assert echo["headers"]["X-Keygate-Key-Id"] == issued.record.id
    assert echo["headers"]["X-Keygate-Workspace-Id"] == "ws-200"
    assert response.headers["X-Request-Id"] == echo["headers"]["X-Request-ID"]
    assert len(upstream.hits) == 1


@pytest.mark.parametrize(
    "carrier",
    [
        ("Authorization", "Bearer {}"),
        ("Authorization", "bearer {}"),
        ("Authorization", "Api-Key {}"),
        ("x-api-key", "{}"),
        ("X-API-KEY", "{}"),
    ],
    ids=["bearer", "bearer-lowercase", "api-key-scheme", "x-api-key", "x-api-key-uppercase"],
)
async def test_every_default_credential_source_works(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, carrier: tuple[str, str]
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    name, template = carrier
    echo = await echoed(
        await http.get(f"{gateway.url}/echo/x", headers={name: template.format(issued.secret)})
    )
    assert echo["headers"]["X-Keygate-Key-Id"] == issued.record.id


async def test_an_imported_key_of_another_format_works(
    gateway: Gateway, http: aiohttp.ClientSession, store: KeyStore
) -> None:
    legacy = "sk-legacy-0123456789abcdefABCDEF"
    imported = await store.create(
        {"workspace_id": "ws-a", "user_id": "u-1", "scopes": ECHO_SCOPES}, secret=legacy
    )
    echo = await echoed(await http.get(f"{gateway.url}/echo/x", headers=bearer(legacy)))
    assert echo["headers"]["X-Keygate-Key-Id"] == imported.record.id


async def test_a_key_imported_by_hash_only_works(
    gateway: Gateway, http: aiohttp.ClientSession, store: KeyStore
) -> None:
    legacy = "legacy-secret-known-only-to-the-client"
    imported = await store.create(
        {"workspace_id": "ws-a", "user_id": "u-1", "scopes": ECHO_SCOPES},
        sha256=hashlib.sha256(legacy.encode()).hexdigest(),
    )
    echo = await echoed(await http.get(f"{gateway.url}/echo/x", headers={"x-api-key": legacy}))
    assert echo["headers"]["X-Keygate-Key-Id"] == imported.record.id


async def test_concurrent_requests_all_pass_with_coalesced_redis_calls(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    keys = [await make_key(scopes=ECHO_SCOPES) for _ in range(5)]
    responses = await asyncio.gather(
        *(
            http.get(f"{gateway.url}/echo/{i}", headers=bearer(keys[i % 5].secret))
            for i in range(60)
        )
    )
    assert [r.status for r in responses] == [200] * 60
    for i, response in enumerate(responses):
        assert (await response.json())["headers"]["X-Keygate-Key-Id"] == keys[i % 5].record.id
    stats = gateway.mux.stats
    assert stats.writes < stats.commands  # several requests' commands shared a write


async def test_the_openai_sdk_works_through_the_gateway(
    gateway: Gateway, make_key: MakeKey, upstream: Upstream
) -> None:
    issued = await make_key(scopes=["chat:invoke", "models:read"], resources=["demo-small"])
    assert issued.secret is not None
    client = openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=issued.secret, max_retries=0, timeout=10
    )
    bad = openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="kg_not-a-real-key", max_retries=0, timeout=10
    )
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "through the gateway"}
    ]
    try:
        models = await client.models.list()
        assert "demo-small" in [m.id for m in models.data]

        completion = await client.chat.completions.create(model="demo-small", messages=messages)
        assert completion.choices[0].message.content == "Echo: through the gateway"
        assert completion.usage is not None and completion.usage.total_tokens > 0

        stream = await client.chat.completions.create(
            model="demo-small",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert len(parts) > 3  # many events, not one
        assert "".join(parts) == "Echo: through the gateway"

        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(model="demo-large", messages=messages)
        assert denied.value.code == "forbidden_resource"

        with pytest.raises(openai.AuthenticationError) as refused:
            await bad.chat.completions.create(model="demo-small", messages=messages)
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_key"
    finally:
        await client.close()
        await bad.close()
    for hit in upstream.hits:  # the SDK's key never reached the upstream
        assert "Authorization" not in hit.headers
        assert hit.headers["X-Keygate-Key-Id"] == issued.record.id


async def test_encoded_response_bytes_pass_through_undecoded(
    start_gateway: StartGateway, serve_app: ServeApp, make_key: MakeKey
) -> None:
    original = b'{"compressed": true}' * 100
    packed = gzip.compress(original)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app = web.Application()
    app.router.add_get("/gz", gzipped)
    port = await serve_app(app)
    gateway = await start_gateway(
        upstreams={"gz": {"url": f"http://127.0.0.1:{port}"}},
        routes=[{"name": "gz", "path": "/gz", "upstream": "gz"}],
    )
    issued = await make_key()
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        response = await raw.get(f"{gateway.url}/gz", headers=bearer(issued.secret))
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == packed
    async with aiohttp.ClientSession() as decoding:
        response = await decoding.get(f"{gateway.url}/gz", headers=bearer(issued.secret))
        assert await response.read() == original


async def test_head_and_bodiless_statuses_complete(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    issued = await make_key(scopes=ECHO_SCOPES)
    response = await http.head(f"{gateway.url}/echo/x", headers=bearer(issued.secret))
    assert response.status == 200 and await response.read() == b""
    for code in (204, 304):
        response = await http.get(
            f"{gateway.url}/echo/status/{code}", headers=bearer(issued.secret)
        )
        assert response.status == code and await response.read() == b""
    # The connection is still good for the next request.
    await echoed(await http.get(f"{gateway.url}/echo/x", headers=bearer(issued.secret)))
