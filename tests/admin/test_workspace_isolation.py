"""A workspace-A admin can never read, change, rotate or revoke a workspace-B key."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.store.keystore import KeyStore
from tests.conftest import MakeKey, bearer

Client = TestClient[Any, Any]


@pytest.fixture
async def two_workspaces(make_key: MakeKey) -> dict[str, Any]:
    admin_a = await make_key(name="admin-a", scopes=["apikeys:*"], workspace_id="ws-a")
    victim = await make_key(name="b-key", scopes=["chat:invoke"], workspace_id="ws-b")
    org = await make_key(name="org", scopes=["org:admin"], workspace_id="ws-a")
    return {"a": admin_a.secret, "victim": victim, "org": org.secret}


async def test_workspace_a_admin_cannot_see_b_keys(
    admin_client: Client, two_workspaces: dict[str, Any]
) -> None:
    a, victim = two_workspaces["a"], two_workspaces["victim"]
    listed = await (await admin_client.get("/v1/keys", headers=bearer(a))).json()
    assert victim.record.id not in {k["id"] for k in listed["data"]}
    assert {k["workspace_id"] for k in listed["data"]} == {"ws-a"}
    shown = await admin_client.get(f"/v1/keys/{victim.record.id}", headers=bearer(a))
    assert shown.status == 404  # the same answer as for an id that does not exist
    other = await admin_client.get("/v1/keys?workspace_id=ws-b", headers=bearer(a))
    assert other.status == 403


async def test_workspace_a_admin_cannot_change_rotate_or_revoke_b_keys(
    admin_client: Client, two_workspaces: dict[str, Any], store: KeyStore
) -> None:
    a, victim = two_workspaces["a"], two_workspaces["victim"]
    url = f"/v1/keys/{victim.record.id}"
    assert (await admin_client.patch(url, json={"disabled": True}, headers=bearer(a))).status == 404
    assert (await admin_client.post(f"{url}/rotate", headers=bearer(a))).status == 404
    assert (await admin_client.delete(url, headers=bearer(a))).status == 404
    after = await store.get(victim.record.id)
    assert after is not None
    assert (after.disabled, after.hash, after.updated_at) == (
        False,
        victim.record.hash,
        victim.record.updated_at,
    )
    assert (await store.authenticate(victim.secret)).status == "ok"


async def test_workspace_a_admin_cannot_create_keys_in_b(
    admin_client: Client, two_workspaces: dict[str, Any], store: KeyStore
) -> None:
    a = two_workspaces["a"]
    for path, body in (
        ("/v1/keys", {"workspace_id": "ws-b"}),
        ("/v1/keys/import", {"workspace_id": "ws-b", "key": "sk-planted-key-123"}),
    ):
        response = await admin_client.post(path, json=body, headers=bearer(a))
        assert response.status == 403
        assert "workspace_id" in (await response.json())["detail"]
    assert await store.count("ws-b") == 1


async def test_guessed_ids_reveal_nothing(
    admin_client: Client, two_workspaces: dict[str, Any]
) -> None:
    a = two_workspaces["a"]
    for key_id in (str(uuid.uuid4()), "not-a-uuid", "ws-b"):
        response = await admin_client.get(f"/v1/keys/{key_id}", headers=bearer(a))
        assert response.status == 404
        assert (await response.json())["detail"] == "no API key with this id"
    for escape in ("/v1/keys/../ws-b", "/v1/keys/%2e%2e/ws-b"):
        escaped = await admin_client.get(escape, headers=bearer(a))
        assert escaped.status == 404 and escaped.content_type == "application/problem+json"


async def test_org_admin_sees_and_manages_every_workspace(
    admin_client: Client, two_workspaces: dict[str, Any]
) -> None:
    org, victim = two_workspaces["org"], two_workspaces["victim"]
    listed = await (await admin_client.get("/v1/keys", headers=bearer(org))).json()
    assert {"ws-a", "ws-b"} <= {k["workspace_id"] for k in listed["data"]}
    only_b = await (
        await admin_client.get("/v1/keys?workspace_id=ws-b", headers=bearer(org))
    ).json()
    assert [k["id"] for k in only_b["data"]] == [victim.record.id]
    url = f"/v1/keys/{victim.record.id}"
    assert (
        await admin_client.patch(url, json={"name": "renamed"}, headers=bearer(org))
    ).status == 200
    created = await admin_client.post(
        "/v1/keys", json={"workspace_id": "ws-c"}, headers=bearer(org)
    )
    assert created.status == 201 and (await created.json())["workspace_id"] == "ws-c"
    assert (await admin_client.delete(url, headers=bearer(org))).status == 204


async def test_no_key_can_mint_or_take_over_a_more_powerful_key(
    admin_client: Client, make_key: MakeKey
) -> None:
    a = (await make_key(scopes=["apikeys:*"], workspace_id="ws-a")).secret
    root = await make_key(name="root", scopes=["*"], workspace_id="ws-a")
    for scopes in (["*"], ["org:admin"]):
        minted = await admin_client.post("/v1/keys", json={"scopes": scopes}, headers=bearer(a))
        assert minted.status == 403 and "scopes" in (await minted.json())["detail"]
    url = f"/v1/keys/{root.record.id}"
    assert (await admin_client.post(f"{url}/rotate", headers=bearer(a))).status == 403
    assert (await admin_client.patch(url, json={"disabled": True}, headers=bearer(a))).status == 403
    assert (await admin_client.delete(url, headers=bearer(a))).status == 403
    mine = await make_key(scopes=["chat:invoke"], workspace_id="ws-a")
    raised = await admin_client.patch(
        f"/v1/keys/{mine.record.id}", json={"scopes": ["*"]}, headers=bearer(a)
    )
    assert raised.status == 403
    assert (await admin_client.get("/v1/keys", headers=bearer(root.secret))).status == 200
