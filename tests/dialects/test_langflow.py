"""Langflow's ``/api/v1/api_key/`` (seeds/langflow-get-api-keys.txt): the caller's own keys
listed, created and deleted with ``x-api-key`` or Bearer, in Langflow's field names and
types, driven by raw HTTP and by both Python clients (langflow-sdk, langflow-client)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime
from typing import Any

import aiohttp
import langflow_client
import langflow_sdk
import pytest
from langflow_sdk.exceptions import LangflowAuthError, LangflowHTTPError
from pydantic import BaseModel, ConfigDict

from gateway.store.keystore import Issued, KeyStore
from tests.conftest import MakeKey
from tests.proxy.conftest import Gateway, StartGateway

PATH = "/api/v1/api_key/"
LISTED = {
    "name",
    "last_used_at",
    "total_uses",
    "is_active",
    "id",
    "api_key",
    "user_id",
    "created_at",
}
CREATED = LISTED - {"created_at"}  # Langflow's UnmaskedApiKeyRead
MANAGER = ["apikeys:view", "apikeys:create", "apikeys:delete", "models:read"]


class ApiKeyRead(BaseModel):
    """Langflow's own read model (types as its server declares them), strict on extras."""

    model_config = ConfigDict(extra="forbid")
    name: str | None
    last_used_at: datetime | None
    total_uses: int
    is_active: bool
    id: uuid.UUID
    api_key: str
    user_id: uuid.UUID
    created_at: datetime


class ApiKeysResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    total_count: int
    user_id: uuid.UUID
    api_keys: list[ApiKeyRead]


def key(issued: Issued) -> dict[str, str]:
    assert issued.secret is not None
    return {"x-api-key": issued.secret}


async def listing(
    gateway: Gateway, http: aiohttp.ClientSession, issued: Issued, path: str = PATH
) -> dict[str, Any]:
    async with http.get(f"{gateway.url}{path}", headers=key(issued)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = await response.json()
    return body


async def test_lists_the_callers_own_keys_in_the_seed_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    user = str(uuid.uuid4())
    caller = await make_key(name="lister", scopes=MANAGER, workspace_id="ws-l", user_id=user)
    off = await make_key(name="off", workspace_id="ws-l", user_id=user, disabled=True)
    # Used once through a proxied route, so its usage fields are filled.
    async with http.get(f"{gateway.url}/v1/models", headers=key(caller)) as response:
        assert response.status == 200
    body = await listing(gateway, http, caller)
    assert set(body) == {"total_count", "user_id", "api_keys"}
    parsed = ApiKeysResponse.model_validate(body)  # the seed's names, Langflow's types
    assert parsed.total_count == len(body["api_keys"]) == 2
    assert body["user_id"] == user
    keys = {k["id"]: k for k in body["api_keys"]}
    assert set(keys) == {caller.record.id, off.record.id}
    for entry in body["api_keys"]:
        assert set(entry) == LISTED
        assert entry["user_id"] == user
        assert entry["created_at"].endswith("Z")
    mine = keys[caller.record.id]
    assert mine["name"] == "lister" and mine["is_active"] is True
    assert mine["api_key"] == caller.record.label
    assert mine["total_uses"] == 1 and mine["last_used_at"].endswith("Z")
    assert keys[off.record.id]["is_active"] is False
    assert keys[off.record.id]["total_uses"] == 0 and keys[off.record.id]["last_used_at"] is None
    assert caller.secret not in str(body) and str(off.secret) not in str(body)


async def test_a_caller_whose_only_key_is_itself_counts_one(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-alone")
    body = await listing(gateway, http, caller)
    assert body["total_count"] == 1
    assert [k["id"] for k in body["api_keys"]] == [caller.record.id]


async def test_other_users_keys_in_the_same_workspace_are_not_listed(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-shared")
    neighbour = await make_key(scopes=["apikeys:view"], workspace_id="ws-shared")
    mine = await listing(gateway, http, caller)
    theirs = await listing(gateway, http, neighbour)
    assert [k["id"] for k in mine["api_keys"]] == [caller.record.id]
    assert [k["id"] for k in theirs["api_keys"]] == [neighbour.record.id]
    assert mine["user_id"] != theirs["user_id"]


async def test_the_same_user_in_another_workspace_is_not_listed(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    user = str(uuid.uuid4())
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-one", user_id=user)
    await make_key(name="elsewhere", workspace_id="ws-two", user_id=user)
    body = await listing(gateway, http, caller)
    assert body["total_count"] == 1
    assert [k["id"] for k in body["api_keys"]] == [caller.record.id]


async def test_bearer_and_the_path_without_its_slash_are_served(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-bearer")
    headers = {"Authorization": f"Bearer {caller.secret}"}
    for path in (PATH, PATH.rstrip("/")):
        async with http.get(f"{gateway.url}{path}", headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["total_count"] == 1


async def test_expired_keys_are_inactive(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    user = str(uuid.uuid4())
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-exp", user_id=user)
    old = await make_key(
        workspace_id="ws-exp", user_id=user, expires_at=int(time.time() * 1000) + 300
    )
    await asyncio.sleep(0.4)
    body = await listing(gateway, http, caller)
    active = {k["id"]: k["is_active"] for k in body["api_keys"]}
    assert active == {caller.record.id: True, old.record.id: False}


@pytest.mark.parametrize(
    ("method", "path", "scopes", "status"),
    [
        ("GET", PATH, None, 401),
        ("GET", PATH, "bad", 401),
        ("GET", PATH, ["models:read"], 403),
        ("POST", PATH, ["apikeys:view"], 403),
        ("DELETE", f"{PATH}{uuid.uuid4()}", ["apikeys:view", "apikeys:create"], 403),
    ],
)
async def test_401_and_403_in_langflow_shape(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    method: str,
    path: str,
    scopes: list[str] | str | None,
    status: int,
) -> None:
    headers = {}
    if scopes == "bad":
        headers = {"x-api-key": "kg_not_a_key"}
    elif isinstance(scopes, list):
        headers = key(await make_key(scopes=scopes))
    async with http.request(method, f"{gateway.url}{path}", headers=headers, json={}) as response:
        assert response.status == status
        body = await response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    if scopes is None:
        assert body["detail"] == "An API key must be passed as query or header"


async def test_405_in_langflow_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"])
    async with http.put(f"{gateway.url}{PATH}", headers=key(caller)) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, POST"
        assert await response.json() == {"detail": "Method Not Allowed"}


async def test_create_then_list_then_delete(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-cycle")
    url = f"{gateway.url}{PATH}"
    async with http.post(url, headers=key(caller), json={"name": "ci"}) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        created = await response.json()
    assert set(created) == CREATED
    assert created["name"] == "ci" and created["user_id"] == caller.record.user_id
    assert created["is_active"] is True and created["total_uses"] == 0
    assert created["last_used_at"] is None
    secret = created["api_key"]
    record = await store.get(created["id"])
    assert record is not None and record.workspace_id == "ws-cycle"
    assert record.scopes == ("models:read",)  # the caller's minus apikeys:*
    assert record.metadata == {"created_via": "langflow", "created_by_key": caller.record.id}
    async with http.get(f"{gateway.url}/v1/models", headers={"x-api-key": secret}) as response:
        assert response.status == 200  # the new secret works on the data plane

    body = await listing(gateway, http, caller)
    assert body["total_count"] == 2
    listed = {k["id"]: k for k in body["api_keys"]}[created["id"]]
    assert listed["api_key"] == record.label and secret not in str(body)

    async with http.delete(f"{url}{created['id']}", headers=key(caller)) as response:
        assert response.status == 200
        assert await response.json() == {"detail": "API Key deleted"}
    assert await store.get(created["id"]) is None
    body = await listing(gateway, http, caller)
    assert [k["id"] for k in body["api_keys"]] == [caller.record.id]
    async with http.get(f"{gateway.url}/v1/models", headers={"x-api-key": secret}) as response:
        assert response.status == 401


async def test_a_created_key_is_never_looser_than_its_creator(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    expires = int(time.time() * 1000) + 3_600_000
    caller = await make_key(
        scopes=["apikeys:*", "org:admin", "chat:invoke"],
        resources=("gpt-4o-mini",),
        expires_at=expires,
        limit_micro=5_000_000,
        limit_reset="daily",
    )
    async with http.post(f"{gateway.url}{PATH}", headers=key(caller), json={}) as response:
        assert response.status == 200
        created = await response.json()
    assert created["name"] is None
    record = await store.get(created["id"])
    assert record is not None
    assert record.scopes == ("chat:invoke",)
    assert record.resources == ("gpt-4o-mini",)
    assert record.expires_at == expires
    assert (record.limit_micro, record.limit_reset) == (5_000_000, "daily")
    assert (record.user_id, record.workspace_id) == (caller.record.user_id, "ws-a")


async def test_a_created_key_inherits_its_creators_max_in_flight(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    caller = await make_key(scopes=["apikeys:*", "chat:invoke"], max_in_flight=3)
    plain = await make_key(scopes=["apikeys:*", "chat:invoke"])
    made = {}
    for creator in (caller, plain):
        async with http.post(f"{gateway.url}{PATH}", headers=key(creator), json={}) as response:
            assert response.status == 200
            made[creator.record.id] = (await response.json())["id"]
    # What Redis holds for each new key: the creator's limit, or none.
    client = store.client
    inherited = await client.hget(store.names.record(made[caller.record.id]), "max_in_flight")
    assert inherited in ("3", b"3")
    assert await client.hget(store.names.record(made[plain.record.id]), "max_in_flight") is None


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "missing"),
        (b"{not json", "json_invalid"),
        (b"[" * 200_000, "json_invalid"),  # too deep for the parser: still a 422, not a 500
        (b"[1]", "model_attributes_type"),
        (b'{"name": 5}', "string_type"),
        (json.dumps({"name": "x" * 257}).encode(), "string_too_long"),
    ],
)
async def test_create_rejects_bad_bodies_with_fastapi_422(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    store: KeyStore,
    data: bytes,
    kind: str,
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-422")
    headers = {**key(caller), "Content-Type": "application/json"}
    async with http.post(f"{gateway.url}{PATH}", headers=headers, data=data) as response:
        assert response.status == 422
        body = await response.json()
    [problem] = body["detail"]
    assert problem["type"] == kind and problem["loc"][0] == "body"
    assert await store.count("ws-422") == 1  # nothing was created


async def test_deleting_another_users_or_workspaces_key_is_400_as_in_langflow(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    user = str(uuid.uuid4())
    caller = await make_key(scopes=MANAGER, workspace_id="ws-d", user_id=user)
    neighbour = await make_key(workspace_id="ws-d")
    mine_elsewhere = await make_key(workspace_id="ws-d2", user_id=user)
    for target in (neighbour.record.id, mine_elsewhere.record.id, str(uuid.uuid4())):
        async with http.delete(f"{gateway.url}{PATH}{target}", headers=key(caller)) as response:
            assert response.status == 400
            assert await response.json() == {"detail": "API Key not found"}
    assert await store.get(neighbour.record.id) is not None
    assert await store.get(mine_elsewhere.record.id) is not None
    async with http.delete(f"{gateway.url}{PATH}not-a-uuid", headers=key(caller)) as response:
        assert response.status == 422
        assert (await response.json())["detail"][0]["loc"] == ["path", "api_key_id"]


async def test_deleting_a_more_powerful_own_key_is_403(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    user = str(uuid.uuid4())
    caller = await make_key(scopes=["apikeys:delete"], user_id=user)
    admin = await make_key(scopes=["org:admin"], user_id=user)
    async with http.delete(f"{gateway.url}{PATH}{admin.record.id}", headers=key(caller)) as r:
        assert r.status == 403
        assert set(await r.json()) == {"detail"}
    assert await store.get(admin.record.id) is not None


async def test_langflow_sdk_round_trip(gateway: Gateway, make_key: MakeKey) -> None:
    """langflow-sdk has no API-key methods: its generic request sends x-api-key and turns
    ``detail`` into typed errors. httpx does not retry, so a 5xx fails at once."""
    caller = await make_key(scopes=MANAGER, workspace_id="ws-sdk")

    def cycle() -> tuple[Any, Any, Any, Any]:
        with langflow_sdk.Client(gateway.url, api_key=caller.secret, timeout=5) as client:
            created = client._request("POST", PATH, json={"name": "sdk"}).json()
            listed = client._request("GET", PATH).json()
            deleted = client._request("DELETE", f"{PATH}{created['id']}").json()
            with pytest.raises(LangflowHTTPError) as missing:
                client._request("DELETE", f"{PATH}{created['id']}")
        return created, listed, deleted, missing.value

    created, listed, deleted, missing = await asyncio.to_thread(cycle)
    assert set(created) == CREATED
    parsed = ApiKeysResponse.model_validate(listed)
    assert {str(k.id) for k in parsed.api_keys} == {caller.record.id, created["id"]}
    assert deleted == {"detail": "API Key deleted"}
    assert (missing.status_code, missing.detail) == (400, "API Key not found")

    def refused() -> LangflowAuthError:
        with (
            langflow_sdk.Client(gateway.url, api_key="kg_wrong", timeout=5) as client,
            pytest.raises(LangflowAuthError) as caught,
        ):
            client._request("GET", PATH)
        return caught.value

    error = await asyncio.to_thread(refused)
    assert error.status_code == 401 and error.detail == "Invalid or missing API key"


async def test_langflow_client_round_trip(gateway: Gateway, make_key: MakeKey) -> None:
    """langflow-client (unofficial) also has no API-key methods; its ``request`` prefixes
    ``/api`` and sends x-api-key. A requests Session does not retry by default."""
    caller = await make_key(scopes=MANAGER, workspace_id="ws-client")
    options = {"base_url": gateway.url, "api_key": caller.secret}

    def cycle() -> tuple[Any, Any, Any]:
        client = langflow_client.LangflowClient(options)
        path = PATH.removeprefix("/api")
        created = client.request(
            path=path,
            method="POST",
            body=json.dumps({"name": "client"}),
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        listed = client.request(path=path, method="GET", timeout=5)
        deleted = client.request(path=f"{path}{created['id']}", method="DELETE", timeout=5)
        return created, listed, deleted

    created, listed, deleted = await asyncio.to_thread(cycle)
    assert created["name"] == "client" and set(created) == CREATED
    assert listed["total_count"] == 2
    assert created["id"] in {k["id"] for k in listed["api_keys"]}
    assert deleted == {"detail": "API Key deleted"}

    def refused() -> Any:
        client = langflow_client.LangflowClient({"base_url": gateway.url})
        with pytest.raises(langflow_client.LangflowError) as caught:
            client.request(path=PATH.removeprefix("/api"), method="GET", timeout=5)
        return caught.value.cause

    response = await asyncio.to_thread(refused)
    assert response.status_code == 401
    assert response.json() == {"detail": "An API key must be passed as query or header"}


async def test_the_path_can_be_moved_or_the_dialect_disabled(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=MANAGER)
    moved = await start_gateway(dialects={"langflow": {"path": "/lf/api_key"}})
    for path in ("/lf/api_key", "/lf/api_key/"):
        async with http.get(f"{moved.url}{path}", headers=key(caller)) as response:
            assert response.status == 200
    async with http.delete(f"{moved.url}/lf/api_key/{uuid.uuid4()}", headers=key(caller)) as r:
        assert r.status == 400
    off = await start_gateway(dialects={"langflow": {"enabled": False}})
    async with http.get(f"{off.url}{PATH}", headers=key(caller)) as response:
        assert response.status == 404  # no dialect, no route: the proxy's own 404
