"""Bad input to the management API: a specific status, a problem body naming the field,
and nothing written."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.store.keystore import KeyStore
from tests.conftest import MakeKey, bearer

Client = TestClient[Any, Any]


@pytest.fixture
async def admin(make_key: MakeKey) -> str:
    secret = (await make_key(name="admin", scopes=["apikeys:*"])).secret
    assert secret
    return secret


BAD_FIELDS = [
    ({"bogus": 1}, "bogus", "unknown field"),
    ({"name": 5}, "name", "must be a string"),
    ({"name": "x" * 257}, "name", "at most 256"),
    ({"scopes": "chat:invoke"}, "scopes", "list"),
    ({"scopes": ["has space"]}, "scopes", "must match"),
    ({"resources": [1]}, "resources", "must be a string"),
    ({"disabled": "yes"}, "disabled", "true or false"),
    ({"limit": -1}, "limit", "at least 0"),
    ({"limit": "5"}, "limit", "must be a number"),
    ({"limit": True}, "limit", "must be a number"),
    ({"limit": 1e300}, "limit", "at most"),
    ({"limit_reset": "hourly"}, "limit_reset", "daily, weekly, monthly"),
    ({"expires_at": "tomorrow"}, "expires_at", "RFC 3339"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "in the future"),
    ({"expires_at": "2099-01-01T00:00:00"}, "expires_at", "time zone"),
    ({"type": "ROOT"}, "type", "must be one of"),
    ({"spend_caps": [{"amount": -2, "period": "daily"}]}, "spend_caps", "at least 0"),
    ({"spend_caps": [{"amount": 2, "period": "yearly"}]}, "spend_caps", "period"),
    ({"spend_caps": [{"amount": 2}]}, "spend_caps", "exactly amount and period"),
    ({"rate_limit": {"requests": 0, "period_seconds": 1}}, "rate_limit", "requests"),
    ({"rate_limit": {"requests": 5, "period_seconds": 0}}, "rate_limit", "greater than 0"),
    ({"max_in_flight": 0}, "max_in_flight", "integer from 1"),
    ({"max_in_flight": -1}, "max_in_flight", "integer from 1"),
    ({"max_in_flight": "x"}, "max_in_flight", "integer from 1"),
    ({"max_in_flight": 1.5}, "max_in_flight", "integer from 1"),
    ({"max_in_flight": True}, "max_in_flight", "integer from 1"),
    ({"metadata": {"k": 1}}, "metadata", "string"),
    ({"user_id": "bob"}, "user_id", "UUID"),
    ({"workspace_id": "a/b"}, "workspace_id", "must match"),
    ({"disabled": None}, "disabled", "must not be null"),
]


@pytest.mark.parametrize(("body", "field", "text"), BAD_FIELDS)
async def test_create_with_a_bad_field_is_400_naming_it_and_writes_nothing(
    admin_client: Client, admin: str, store: KeyStore, body: dict[str, Any], field: str, text: str
) -> None:
    before = await store.count(None)
    response = await admin_client.post("/v1/keys", json=body, headers=bearer(admin))
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["code"] == "invalid_request"
    assert problem["detail"].startswith(f"{field}: ")
    assert problem["errors"][0]["field"] == field and text in problem["errors"][0]["detail"]
    assert await store.count(None) == before


async def test_non_finite_numbers_are_refused(admin_client: Client, admin: str) -> None:
    for raw in ('{"limit": NaN}', '{"limit": Infinity}', '{"limit": -Infinity}'):
        response = await admin_client.post(
            "/v1/keys", data=raw, headers={**bearer(admin), "Content-Type": "application/json"}
        )
        assert response.status == 400, raw


async def test_every_bad_field_is_reported_at_once(admin_client: Client, admin: str) -> None:
    response = await admin_client.post(
        "/v1/keys", json={"limit": -1, "name": 3, "nope": 1}, headers=bearer(admin)
    )
    fields = [e["field"] for e in (await response.json())["errors"]]
    assert sorted(fields) == ["limit", "name", "nope"]


async def test_patch_with_bad_input_changes_nothing(
    admin_client: Client, admin: str, make_key: MakeKey, store: KeyStore
) -> None:
    target = await make_key(name="keep")
    url = f"/v1/keys/{target.record.id}"
    for body in ({"name": "changed", "limit": -5}, {}, {"workspace_id": "ws-b"}, {"key": "x" * 20}):
        response = await admin_client.patch(url, json=body, headers=bearer(admin))
        assert response.status == 400, body
    after = await store.get(target.record.id)
    assert after is not None and after.name == "keep" and after.workspace_id == "ws-a"
    assert after.updated_at == target.record.updated_at


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "key"),
        ({"key": "short"}, "key"),
        ({"sha256": "zz"}, "sha256"),
        ({"key": "long-enough-key", "sha256": "a" * 64}, "key"),
        ({"key": "has space inside"}, "key"),
    ],
)
async def test_import_needs_exactly_one_valid_secret_or_hash(
    admin_client: Client, admin: str, body: dict[str, Any], field: str
) -> None:
    response = await admin_client.post("/v1/keys/import", json=body, headers=bearer(admin))
    assert response.status == 400
    assert field in [e["field"] for e in (await response.json())["errors"]]


async def test_a_body_over_one_mebibyte_is_413(
    admin_client: Client, admin: str, store: KeyStore
) -> None:
    body = '{"name": "' + "x" * (1024 * 1024) + '"}'
    response = await admin_client.post(
        "/v1/keys", data=body, headers={**bearer(admin), "Content-Type": "application/json"}
    )
    assert response.status == 413
    assert (await response.json())["code"] == "payload_too_large"
    assert await store.count(None) == 1


async def test_a_chunked_body_over_the_limit_is_413(admin_client: Client, admin: str) -> None:
    async def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 65536

    response = await admin_client.post(
        "/v1/keys", data=chunks(), headers={**bearer(admin), "Content-Type": "application/json"}
    )
    assert response.status == 413


async def test_a_body_that_is_not_json_is_415_or_400(admin_client: Client, admin: str) -> None:
    as_form = await admin_client.post(
        "/v1/keys",
        data="name=x",
        headers={**bearer(admin), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert as_form.status == 415
    assert (await as_form.json())["code"] == "unsupported_media_type"
    broken = await admin_client.post(
        "/v1/keys", data="{not json", headers={**bearer(admin), "Content-Type": "application/json"}
    )
    assert broken.status == 400 and (await broken.json())["detail"].startswith("body:")
    array = await admin_client.post("/v1/keys", json=[1, 2], headers=bearer(admin))
    assert array.status == 400 and "JSON object" in (await array.json())["detail"]
    empty = await admin_client.post("/v1/keys", headers=bearer(admin))
    assert empty.status == 415


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-3", "limit"),
        ("limit=ten", "limit"),
        ("include_disabled=maybe", "include_disabled"),
        ("cursor=abc", "cursor"),
        ("user_id=bob", "user_id"),
        ("colour=red", "colour"),
    ],
)
async def test_bad_list_parameters_are_400_naming_them(
    admin_client: Client, admin: str, query: str, field: str
) -> None:
    response = await admin_client.get(f"/v1/keys?{query}", headers=bearer(admin))
    assert response.status == 400
    assert (await response.json())["errors"][0]["field"] == field


@pytest.mark.parametrize(
    "body", [{"grace_seconds": -1}, {"grace_seconds": "10"}, {"grace_seconds": 10**9}, {"grace": 5}]
)
async def test_bad_rotation_input_is_400_and_keeps_the_secret(
    admin_client: Client, admin: str, make_key: MakeKey, store: KeyStore, body: dict[str, Any]
) -> None:
    target = await make_key()
    response = await admin_client.post(
        f"/v1/keys/{target.record.id}/rotate", json=body, headers=bearer(admin)
    )
    assert response.status == 400
    after = await store.get(target.record.id)
    assert after is not None and after.hash == target.record.hash


async def test_unknown_path_and_method_are_problems(admin_client: Client, admin: str) -> None:
    missing = await admin_client.get("/v2/nothing", headers=bearer(admin))
    assert missing.status == 404 and missing.content_type == "application/problem+json"
    wrong = await admin_client.put("/v1/keys", headers=bearer(admin))
    assert wrong.status == 405 and "POST" in wrong.headers["Allow"]
    assert (await wrong.json())["code"] == "method_not_allowed"
