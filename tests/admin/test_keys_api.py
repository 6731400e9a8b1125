"""Every management endpoint's success path, through HTTP, against a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.store import secrets
from gateway.store.keystore import KeyStore
from gateway.usage.periods import FixedClock
from tests.conftest import MakeKey, bearer

Client = TestClient[Any, Any]


async def _admin(make_key: MakeKey, workspace: str = "ws-a") -> str:
    issued = await make_key(name="admin", scopes=["apikeys:*"], workspace_id=workspace)
    assert issued.secret
    return issued.secret


async def test_create_returns_201_the_record_and_the_secret_once(
    admin_client: Client, make_key: MakeKey, store: KeyStore
) -> None:
    # One instant for both reads, so the derived fields that depend on "now"
    # (rate_limit_state.full_at) are equal too.
    store.clock = FixedClock(await store.server_time_ms())
    admin = await _admin(make_key)
    body = {
        "name": "svc",
        "scopes": ["chat:invoke"],
        "resources": ["gpt-4o-mini"],
        "limit": 12.5,
        "limit_reset": "monthly",
        "expires_at": "2099-01-01T00:00:00Z",
        "spend_caps": [{"amount": 1, "period": "daily"}],
        "rate_limit": {"requests": 10, "period_seconds": 60},
        "metadata": {"team": "search"},
        "type": "WORKSPACE_INVOKE",
        "team_name": "search",
    }
    response = await admin_client.post("/v1/keys", json=body, headers=bearer(admin))
    assert response.status == 201
    created = await response.json()
    assert response.headers["Location"] == f"/v1/keys/{created['id']}"
    assert created["key"].startswith("kg_") and not secrets.has_bad_checksum(created["key"], "kg_")
    assert created["hash"] == secrets.hash_secret(created["key"])
    assert created["prefix"] == created["key"][:12]
    assert created["workspace_id"] == "ws-a" and created["status"] == "active"
    assert created["limit"] == 12.5 and created["limit_reset"] == "monthly"
    assert created["expires_at"] == "2099-01-01T00:00:00.000Z"
    assert created["spend_caps"] == [{"amount": 1.0, "period": "daily"}]
    assert created["rate_limit"] == {"requests": 10, "period_seconds": 60.0}
    assert created["resources"] == ["gpt-4o-mini"] and created["metadata"] == {"team": "search"}

    shown = await admin_client.get(f"/v1/keys/{created['id']}", headers=bearer(admin))
    assert shown.status == 200
    again = await shown.json()
    assert "key" not in again and created["key"] not in await shown.text()
    assert again == {k: v for k, v in created.items() if k != "key"}


async def test_the_new_key_works_as_a_credential(admin_client: Client, make_key: MakeKey) -> None:
    admin = await _admin(make_key)
    created = await (
        await admin_client.post(
            "/v1/keys", json={"scopes": ["apikeys:view"]}, headers=bearer(admin)
        )
    ).json()
    for headers in (
        bearer(created["key"]),
        {"x-api-key": created["key"]},
        {"Authorization": f"Api-Key {created['key']}"},
    ):
        response = await admin_client.get("/v1/keys", headers=headers)
        assert response.status == 200


async def test_import_adopts_a_secret_and_a_hash(admin_client: Client, make_key: MakeKey) -> None:
    admin = await _admin(make_key)
    response = await admin_client.post(
        "/v1/keys/import",
        headers=bearer(admin),
        json={"key": "sk-legacy-000111222333", "name": "legacy", "scopes": ["apikeys:view"]},
    )
    assert response.status == 201
    imported = await response.json()
    assert "key" not in imported and imported["imported"] is True
    assert "sk-legacy-000111222333" not in await response.text()
    listed = await admin_client.get("/v1/keys", headers=bearer("sk-legacy-000111222333"))
    assert listed.status == 200

    by_hash = await admin_client.post(
        "/v1/keys/import",
        headers=bearer(admin),
        json={
            "sha256": secrets.hash_secret("another-old-key-42").upper(),
            "scopes": ["apikeys:view"],
        },
    )
    assert by_hash.status == 201
    assert (await by_hash.json())["hash"] == secrets.hash_secret("another-old-key-42")
    assert (await admin_client.get("/v1/keys", headers=bearer("another-old-key-42"))).status == 200


async def test_importing_an_existing_key_is_409(admin_client: Client, make_key: MakeKey) -> None:
    admin = await _admin(make_key)
    body = {"key": "sk-legacy-000111222333"}
    assert (
        await admin_client.post("/v1/keys/import", json=body, headers=bearer(admin))
    ).status == 201
    again = await admin_client.post("/v1/keys/import", json=body, headers=bearer(admin))
    assert again.status == 409
    assert again.content_type == "application/problem+json"
    assert (await again.json())["code"] == "conflict"
    # the admin's own secret cannot be imported a second time either
    clash = await admin_client.post("/v1/keys/import", json={"key": admin}, headers=bearer(admin))
    assert clash.status == 409


async def test_list_pages_with_cursor_and_filters(admin_client: Client, make_key: MakeKey) -> None:
    admin = await _admin(make_key)
    user = str(uuid.uuid4())
    ids = {(await make_key(user_id=user)).record.id for _ in range(5)}
    disabled = await make_key(user_id=user, disabled=True)
    seen: list[str] = []
    url = f"/v1/keys?user_id={user}&limit=2"
    while url:
        response = await admin_client.get(url, headers=bearer(admin))
        assert response.status == 200
        page = await response.json()
        assert len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        url = (
            page["next_cursor"] and f"/v1/keys?user_id={user}&limit=2&cursor={page['next_cursor']}"
        )
    assert sorted(seen) == sorted(ids)
    everything = await admin_client.get(
        f"/v1/keys?user_id={user}&include_disabled=true", headers=bearer(admin)
    )
    listed = {k["id"]: k for k in (await everything.json())["data"]}
    assert set(listed) == ids | {disabled.record.id}
    assert listed[disabled.record.id]["status"] == "disabled"


async def test_patch_changes_only_the_given_fields(admin_client: Client, make_key: MakeKey) -> None:
    admin = await _admin(make_key)
    target = await make_key(name="old", team_name="t", scopes=["chat:invoke"])
    url = f"/v1/keys/{target.record.id}"
    response = await admin_client.patch(
        url,
        headers=bearer(admin),
        json={"name": "new", "team_name": None, "limit": 3, "limit_reset": "daily"},
    )
    assert response.status == 200
    body = await response.json()
    assert (body["name"], body["team_name"], body["scopes"]) == ("new", None, ["chat:invoke"])
    assert (body["limit"], body["limit_reset"]) == (3.0, "daily")
    assert body["hash"] == target.record.hash

    disabled = await admin_client.patch(url, headers=bearer(admin), json={"disabled": True})
    assert (await disabled.json())["status"] == "disabled"
    assert target.secret
    refused = await admin_client.get("/v1/keys", headers=bearer(target.secret))
    assert refused.status == 403 and (await refused.json())["code"] == "disabled"


async def test_max_in_flight_is_set_shown_changed_and_cleared(
    admin_client: Client, make_key: MakeKey
) -> None:
    admin = await _admin(make_key)
    created = await admin_client.post(
        "/v1/keys", headers=bearer(admin), json={"name": "c", "max_in_flight": 5}
    )
    assert created.status == 201
    body = await created.json()
    assert body["max_in_flight"] == 5
    url = f"/v1/keys/{body['id']}"
    assert (await (await admin_client.get(url, headers=bearer(admin))).json())["max_in_flight"] == 5
    changed = await admin_client.patch(url, headers=bearer(admin), json={"max_in_flight": 7})
    assert (changed.status, (await changed.json())["max_in_flight"]) == (200, 7)
    cleared = await admin_client.patch(url, headers=bearer(admin), json={"max_in_flight": None})
    assert (cleared.status, (await cleared.json())["max_in_flight"]) == (200, None)
    listed = await admin_client.get("/v1/keys", headers=bearer(admin))
    assert {k["id"]: k["max_in_flight"] for k in (await listed.json())["data"]}[body["id"]] is None
    plain = await admin_client.post("/v1/keys", headers=bearer(admin), json={"name": "p"})
    assert (await plain.json())["max_in_flight"] is None


async def test_delete_revokes_on_the_very_next_request(
    admin_client: Client, make_key: MakeKey
) -> None:
    admin = await _admin(make_key)
    target = await make_key(scopes=["apikeys:view"])
    assert target.secret
    assert (await admin_client.get("/v1/keys", headers=bearer(target.secret))).status == 200
    response = await admin_client.delete(f"/v1/keys/{target.record.id}", headers=bearer(admin))
    assert response.status == 204
    after = await admin_client.get("/v1/keys", headers=bearer(target.secret))
    assert after.status == 401 and (await after.json())["code"] == "invalid_key"
    gone = await admin_client.get(f"/v1/keys/{target.record.id}", headers=bearer(admin))
    assert gone.status == 404
    twice = await admin_client.delete(f"/v1/keys/{target.record.id}", headers=bearer(admin))
    assert twice.status == 404


async def test_rotate_with_grace_then_the_old_secret_is_refused(
    admin_client: Client, make_key: MakeKey
) -> None:
    admin = await _admin(make_key)
    target = await make_key(name="rot", scopes=["apikeys:view"])
    assert target.secret
    response = await admin_client.post(
        f"/v1/keys/{target.record.id}/rotate", json={"grace_seconds": 0.6}, headers=bearer(admin)
    )
    assert response.status == 200
    rotated = await response.json()
    assert rotated["id"] == target.record.id and rotated["key"] != target.secret
    assert (await admin_client.get("/v1/keys", headers=bearer(rotated["key"]))).status == 200
    assert (await admin_client.get("/v1/keys", headers=bearer(target.secret))).status == 200
    await asyncio.sleep(0.8)
    late = await admin_client.get("/v1/keys", headers=bearer(target.secret))
    assert late.status == 401
    assert (await admin_client.get("/v1/keys", headers=bearer(rotated["key"]))).status == 200


async def test_rotate_without_a_body_has_no_grace(admin_client: Client, make_key: MakeKey) -> None:
    admin = await _admin(make_key)
    target = await make_key(scopes=["apikeys:view"])
    assert target.secret
    response = await admin_client.post(f"/v1/keys/{target.record.id}/rotate", headers=bearer(admin))
    assert response.status == 200
    assert (await admin_client.get("/v1/keys", headers=bearer(target.secret))).status == 401


async def test_expired_key_is_401_and_listed_as_expired(
    admin_client: Client, make_key: MakeKey, store: KeyStore
) -> None:
    admin = await _admin(make_key)
    target = await make_key(scopes=["apikeys:view"])
    assert target.secret
    now = await store.server_time_ms()
    await store.client.hset(store.names.record(target.record.id), "expires_at", now - 1000)
    response = await admin_client.get("/v1/keys", headers=bearer(target.secret))
    assert response.status == 401 and (await response.json())["code"] == "expired"
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    shown = await admin_client.get(f"/v1/keys/{target.record.id}", headers=bearer(admin))
    assert (await shown.json())["status"] == "expired"


async def test_openapi_document_is_served(admin_client: Client) -> None:
    response = await admin_client.get("/openapi.json")
    assert response.status == 200
    assert (await response.json())["openapi"] == "3.1.0"


async def test_an_import_shaped_like_a_keygate_key_with_a_bad_checksum_is_400(
    admin_client: Client, make_key: MakeKey, store: KeyStore
) -> None:
    """The proxy refuses such a secret before asking Redis (a mistyped keygate key), so
    adopting it would make a key that works nowhere: refused at import, naming the field."""
    admin = await _admin(make_key)
    generated = secrets.generate("kg_")
    mistyped = generated[:-1] + ("A" if generated[-1] != "A" else "B")
    response = await admin_client.post(
        "/v1/keys/import", json={"key": mistyped}, headers=bearer(admin)
    )
    assert response.status == 400, await response.text()
    body = await response.json()
    assert [e["field"] for e in body["errors"]] == ["key"]
    assert "checksum" in body["detail"] and "keys.secret_prefix" in body["detail"]
    assert mistyped not in await response.text()
    assert await store.count("ws-a") == 1  # only the admin: nothing was written
    # A real keygate secret (another deployment's, say) is adopted as it is.
    adopted = await admin_client.post(
        "/v1/keys/import", json={"key": generated}, headers=bearer(admin)
    )
    assert adopted.status == 201


async def test_a_short_import_is_400_naming_the_key(
    admin_client: Client, make_key: MakeKey, store: KeyStore
) -> None:
    admin = await _admin(make_key)
    for short in ("sk-12345", "sk-0123456789ab"):  # 8 and 15 characters
        response = await admin_client.post(
            "/v1/keys/import", json={"key": short}, headers=bearer(admin)
        )
        assert response.status == 400, await response.text()
        body = await response.json()
        assert [e["field"] for e in body["errors"]] == ["key"]
        assert "at least 16 characters" in body["detail"] and "sha256" in body["detail"]
    sixteen = await admin_client.post(
        "/v1/keys/import", json={"key": "sk-0123456789abc"}, headers=bearer(admin)
    )
    assert sixteen.status == 201
    assert await store.count("ws-a") == 2


async def test_a_sha256_import_of_a_mistyped_keygate_key_is_refused_on_every_listener(
    admin_client: Client, make_key: MakeKey, store: KeyStore
) -> None:
    """Only the hash was given, so the import cannot tell; the key then fails everywhere
    (401), as on the proxy's routes, never works on one listener and not another."""
    generated = secrets.generate("kg_")
    mistyped = generated[:-1] + ("A" if generated[-1] != "A" else "B")
    await store.create(
        {"workspace_id": "ws-a", "user_id": str(uuid.uuid4()), "scopes": ("apikeys:*",)},
        sha256=secrets.hash_secret(mistyped),
    )
    response = await admin_client.get("/v1/keys", headers=bearer(mistyped))
    assert response.status == 401
    assert (await response.json())["code"] == "invalid_key"
