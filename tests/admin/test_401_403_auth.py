"""Who may call the management API: 401 for no or bad keys, 403 for missing scopes."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.store import secrets
from tests.conftest import MakeKey, bearer

Client = TestClient[Any, Any]
ENDPOINTS = [
    ("GET", "/v1/keys", "apikeys:view"),
    ("POST", "/v1/keys", "apikeys:create"),
    ("POST", "/v1/keys/import", "apikeys:create"),
]


async def test_missing_key_is_401_with_a_bearer_challenge(admin_client: Client) -> None:
    response = await admin_client.get("/v1/keys")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="keygate"'
    assert response.content_type == "application/problem+json"
    body = await response.json()
    assert (body["status"], body["code"]) == (401, "missing_key")
    assert set(body) >= {"type", "title", "status", "detail", "code"}


@pytest.mark.parametrize(
    "header",
    [
        {"Authorization": "Bearer kg_notarealkeyatall"},
        {"Authorization": "Bearer "},
        {"x-api-key": "whatever-12345"},
        {"Authorization": "Bearer a b"},
    ],
)
async def test_unknown_or_malformed_key_is_401_invalid_token(
    admin_client: Client, header: dict[str, str]
) -> None:
    response = await admin_client.get("/v1/keys", headers=header)
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert (await response.json())["code"] == "invalid_key"


async def test_a_well_formed_key_that_was_never_issued_is_401(admin_client: Client) -> None:
    response = await admin_client.get("/v1/keys", headers=bearer(secrets.generate("kg_")))
    assert response.status == 401


async def test_two_different_keys_in_one_request_is_400(
    admin_client: Client, make_key: MakeKey
) -> None:
    one = (await make_key(scopes=["apikeys:*"])).secret
    response = await admin_client.get(
        "/v1/keys", headers={**bearer(one), "x-api-key": "other-key-123"}
    )
    assert response.status == 400
    body = await response.text()
    assert "two different API keys" in body and (one or "") not in body
    same = await admin_client.get("/v1/keys", headers={**bearer(one), "x-api-key": one or ""})
    assert same.status == 200


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
async def test_a_key_without_the_scope_is_403_insufficient_scope(
    admin_client: Client, make_key: MakeKey, method: str, path: str, scope: str
) -> None:
    weak = (await make_key(scopes=["chat:invoke", "apikeys:nothing"])).secret
    response = await admin_client.request(method, path, json={}, headers=bearer(weak))
    assert response.status == 403
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and f'scope="{scope}"' in challenge
    assert (await response.json())["code"] == "forbidden_scope"


@pytest.mark.parametrize(
    ("scopes", "status"),
    [
        (["apikeys:view"], 200),
        (["apikeys:*"], 200),
        (["*"], 200),
        (["org:admin"], 200),
        (["apikeys:create"], 403),
        (["apikeys:view:extra"], 403),
        ([], 403),
    ],
)
async def test_scope_wildcards(
    admin_client: Client, make_key: MakeKey, scopes: list[str], status: int
) -> None:
    secret = (await make_key(scopes=scopes)).secret
    assert (await admin_client.get("/v1/keys", headers=bearer(secret))).status == status


async def test_each_management_scope_opens_only_its_operation(
    admin_client: Client, make_key: MakeKey
) -> None:
    target = await make_key()
    url = f"/v1/keys/{target.record.id}"
    deleter = (await make_key(scopes=["apikeys:delete"])).secret
    updater = (await make_key(scopes=["apikeys:update"])).secret
    assert (
        await admin_client.patch(url, json={"name": "x"}, headers=bearer(deleter))
    ).status == 403
    assert (await admin_client.post(f"{url}/rotate", headers=bearer(deleter))).status == 403
    assert (await admin_client.delete(url, headers=bearer(updater))).status == 403
    assert (
        await admin_client.patch(url, json={"name": "x"}, headers=bearer(updater))
    ).status == 200
    assert (await admin_client.delete(url, headers=bearer(deleter))).status == 204


async def test_a_credential_with_non_ascii_bytes_is_401_not_a_crash(admin_client: Client) -> None:
    response = await admin_client.get("/v1/keys", headers={"x-api-key": "kg_caf\u00e9-key-123"})
    assert response.status == 401
    assert (await response.json())["code"] == "invalid_key"


async def test_a_query_credential_works_for_listing_when_enabled(
    aiohttp_client: Any, settings: Any, store: Any, make_key: MakeKey
) -> None:
    from dataclasses import replace

    from gateway.admin.app import build_admin_app

    with_query = replace(settings, keys=replace(settings.keys, sources=("bearer", "query")))
    client = await aiohttp_client(build_admin_app(with_query, store))
    secret = (await make_key(scopes=["apikeys:view"])).secret
    response = await client.get(f"/v1/keys?api_key={secret}&limit=5")
    assert response.status == 200
