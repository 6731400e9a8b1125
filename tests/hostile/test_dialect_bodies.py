"""Key bodies that parse as JSON but are no text keygate can store, or that nest absurdly
deep, sent to every endpoint that creates or changes a key: the Langflow and OpenRouter
dialects on the proxy listener, and the native admin API. Each is refused in the
endpoint's own error shape, and nothing is written: no listing-index member, no record,
no lookup (Redis is read back: the key names under the test's prefix and the indexes)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.dialects.openrouter import key_hash
from gateway.store.keystore import Issued, KeyStore
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, StartGateway, Upstream

MANAGER = ["apikeys:view", "apikeys:create", "apikeys:update", "apikeys:delete"]


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    """A gateway serving the two dialects that create and change keys (both opt-in)."""
    return await start_gateway(
        dialects={"langflow": {"enabled": True}, "openrouter": {"enabled": True}}
    )

DEEP = 30_000

# Raw bodies: JSON escapes, so the bytes on the wire are valid UTF-8.
BODIES = {
    "lone-high-surrogate": b'{"name": "\\ud800"}',
    "lone-low-surrogate": b'{"name": "a\\udc00b"}',
    "reversed-pair": b'{"name": "\\udc00\\ud800"}',
    "surrogate-in-a-field-name": b'{"name": "ok", "\\ud800": 1}',
    "deep-array": b"[" * DEEP + b"]" * DEEP,
    "deep-unclosed": b"[" * DEEP,
    "deep-in-a-field": b'{"name": "ok", "limit": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deep-object": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,  # under OpenRouter's 64 KiB
    "moderately-deep": b'{"name": "ok", "x": ' + b"[" * 900 + b"]" * 900 + b"}",
    "moderately-deep-list": b"[" * 900 + b"]" * 900,
    "raw-surrogate-bytes": b'{"name": "\xed\xa0\x80"}',  # json decodes them with surrogatepass
}


async def _written(redis: Redis, store: KeyStore, workspace: str) -> tuple[set[str], list[Any]]:
    """Every key name under the test's prefix, and both listing indexes' members."""
    names = {str(name) async for name in redis.scan_iter(match=store.names.all_pattern())}
    index = store.names.workspace_index(workspace)
    members = [
        await redis.zrange(index, 0, -1),
        await redis.zrange(store.names.org_index(), 0, -1),
    ]
    return names, members


def _hash_fields(record: dict[Any, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in record.items() if str(k) not in ("last_used_at",)}


async def _send(
    http: aiohttp.ClientSession, method: str, url: str, caller: Issued, body: bytes
) -> tuple[int, Any]:
    headers = {**bearer(caller.secret), "Content-Type": "application/json"}
    async with http.request(method, url, headers=headers, data=body) as response:
        text = await response.text()
        assert response.content_type == "application/json", (response.status, text[:200])
        return response.status, json.loads(text)


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES)
async def test_langflow_create_refuses_with_fastapi_422_and_writes_nothing(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    store: KeyStore,
    body: bytes,
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-lf")
    before = await _written(redis, store, "ws-lf")
    for path in ("/api/v1/api_key/", "/api/v1/api_key"):
        status, answer = await _send(http, "POST", f"{gateway.url}{path}", caller, body)
        assert status == 422, answer
        [problem] = answer["detail"]
        assert problem["type"] == "json_invalid" and problem["loc"][0] == "body"
    assert await _written(redis, store, "ws-lf") == before


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES)
async def test_openrouter_create_and_update_refuse_with_400_and_write_nothing(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    redis: Redis,
    store: KeyStore,
    body: bytes,
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-or")
    target = await make_key(name="target", workspace_id="ws-or")
    record = store.names.record(target.record.id)
    fields = _hash_fields(await redis.hgetall(record))
    before = await _written(redis, store, "ws-or")
    url = f"{gateway.url}/api/v1/keys"
    for method, at in (("POST", url), ("PATCH", f"{url}/{key_hash(target.record)}")):
        status, answer = await _send(http, method, at, caller, body)
        assert status == 400, (method, answer)
        assert answer == {"error": {"code": 400, "message": answer["error"]["message"]}}
        assert answer["error"]["message"].startswith("the body")
    assert await _written(redis, store, "ws-or") == before
    assert _hash_fields(await redis.hgetall(record)) == fields


ADMIN_CALLS = [
    ("POST", "/v1/keys"),
    ("POST", "/v1/keys/import"),
    ("PATCH", "/v1/keys/{id}"),
    ("POST", "/v1/keys/{id}/rotate"),
]


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES)
async def test_the_admin_api_refuses_with_a_400_problem_and_writes_nothing(
    admin_client: TestClient[Any, Any],
    make_key: MakeKey,
    redis: Redis,
    store: KeyStore,
    body: bytes,
) -> None:
    admin = await make_key(scopes=["apikeys:*"], workspace_id="ws-adm")
    target = await make_key(name="target", workspace_id="ws-adm")
    record = store.names.record(target.record.id)
    fields = _hash_fields(await redis.hgetall(record))
    before = await _written(redis, store, "ws-adm")
    headers = {**bearer(admin.secret), "Content-Type": "application/json"}
    for method, path in ADMIN_CALLS:
        url = path.format(id=target.record.id)
        async with admin_client.request(method, url, headers=headers, data=body) as response:
            text = await response.text()
            assert response.status == 400, (method, path, text)
            assert response.content_type == "application/problem+json"
            problem = json.loads(text)
            assert problem["code"] == "invalid_request" and "Traceback" not in text
    assert await _written(redis, store, "ws-adm") == before
    assert _hash_fields(await redis.hgetall(record)) == fields


async def test_a_depth_near_the_recursion_limit_is_refused_not_a_500(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, redis: Redis, store: KeyStore
) -> None:
    # Such a value parses, then failed when answered back (Langflow echoes a non-object
    # body) or walked: the limit's exact depth depends on the stack, so sweep around it.
    caller = await make_key(scopes=MANAGER, workspace_id="ws-deep")
    before = await _written(redis, store, "ws-deep")
    for depth in range(850, 1001, 10):
        nested = b"[" * depth + b"]" * depth
        status, answer = await _send(http, "POST", f"{gateway.url}/api/v1/api_key/", caller, nested)
        assert status == 422 and answer["detail"][0]["type"] == "json_invalid", depth
        in_a_field = b'{"name": "x", "limit": ' + nested + b"}"
        status, answer = await _send(http, "POST", f"{gateway.url}/api/v1/keys", caller, in_a_field)
        assert status == 400, (depth, answer)
    assert await _written(redis, store, "ws-deep") == before


async def test_the_store_writes_nothing_for_a_value_redis_cannot_take(
    redis: Redis, store: KeyStore
) -> None:
    # The CLI reaches the store without a JSON body: an argument that is not UTF-8 arrives
    # as a lone surrogate ("\udcff"), which no Redis command can carry.
    before = await _written(redis, store, "ws-store")
    values = {"name": "\udcff", "workspace_id": "ws-store", "user_id": str(uuid.uuid4())}
    with pytest.raises(UnicodeEncodeError):
        await store.create({**values, "scopes": ()})
    assert await _written(redis, store, "ws-store") == before


async def test_a_route_body_nested_too_deep_to_read_its_resource_is_refused_not_a_500(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, upstream: Upstream
) -> None:
    # "infer" reads the resource from the JSON body for a key limited to listed ones.
    caller = await make_key(resources=["demo-small"])
    for body in (b"[" * 4000, b"[" * 2000 + b"]" * 2000, b'{"model": "\\ud800"}'):
        async with http.post(
            f"{gateway.url}/infer", data=body, headers=bearer(caller.secret)
        ) as response:
            text = await response.text()
            assert response.status == 403, text
            assert json.loads(text)["code"] == "forbidden_resource"
    assert upstream.hits == []
