"""Flowise's ``GET /api/v1/apikey`` (seeds/flowise-list-api-keys.txt): a bare array of the
caller's workspace keys with ``Authorization: Bearer``, ``type=organization`` for org
admins, and ``page``/``limit`` paging.

The Flowise Python SDK (``flowise`` 1.0.4) has no API-key calls (only predictions), so
these tests send what its docs' curl sends: ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import aiohttp

from gateway.dialects.flowise import MAX_LIMIT
from gateway.store.keystore import Issued
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import Gateway, StartGateway

PATH = "/api/v1/apikey"
FIELDS = {"id", "keyName", "apiKey", "permissions", "createdDate", "updatedDate", "workspaceId"}
ERROR_FIELDS = {"statusCode", "success", "message", "stack"}


async def get(
    http: aiohttp.ClientSession, gateway: Gateway, secret: str | None, query: str = ""
) -> tuple[int, Any]:
    async with http.get(f"{gateway.url}{PATH}{query}", headers=bearer(secret)) as response:
        return response.status, await response.json()


async def later(make_key: MakeKey, **values: Any) -> Issued:
    """A key created in a later millisecond than the one before it: keys made in the same
    millisecond list in id order, and these tests assert creation order."""
    await asyncio.sleep(0.002)
    return await make_key(**values)


def assert_flowise_error(status: int, body: Any, expected: int) -> None:
    assert status == expected
    assert set(body) == ERROR_FIELDS
    assert body["statusCode"] == expected
    assert body["success"] is False
    assert isinstance(body["message"], str) and body["message"]
    assert body["stack"] == {}


async def test_lists_the_callers_workspace_in_the_seed_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(name="lister", scopes=["apikeys:view"], workspace_id="ws-f")
    prod = await later(
        make_key,
        name="Production API Key",
        scopes=["chatflows:view", "chatflows:execute", "agentflows:view"],
        workspace_id="ws-f",
    )
    off = await later(make_key, name="off", workspace_id="ws-f", disabled=True)
    unnamed = await later(make_key, workspace_id="ws-f")
    await later(make_key, name="elsewhere", workspace_id="ws-other")
    async with http.get(f"{gateway.url}{PATH}", headers=bearer(caller.secret)) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        body = await response.json()
    assert isinstance(body, list)
    assert [k["id"] for k in body] == [r.record.id for r in (caller, prod, off, unnamed)]
    for key in body:
        assert set(key) == FIELDS
        for name in ("id", "keyName", "apiKey", "createdDate", "updatedDate", "workspaceId"):
            assert isinstance(key[name], str)
        assert isinstance(key["permissions"], list)
        created = datetime.fromisoformat(key["createdDate"])  # ISO 8601, UTC
        assert created.utcoffset() == timedelta(0)
        assert datetime.fromisoformat(key["updatedDate"]) >= created
        assert key["workspaceId"] == "ws-f"
    first = body[1]
    assert first["keyName"] == "Production API Key"
    assert first["permissions"] == ["chatflows:view", "chatflows:execute", "agentflows:view"]
    assert first["apiKey"] == prod.record.label
    assert body[3]["keyName"] == "" and body[3]["permissions"] == []
    created_dates = [datetime.fromisoformat(k["createdDate"]) for k in body]
    assert created_dates == sorted(created_dates)  # oldest first
    text = str(body)
    for issued in (caller, prod, off, unnamed):
        assert issued.secret is not None and issued.secret not in text


async def test_bearer_is_the_only_credential(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"])
    secret = caller.secret or ""
    for headers in ({"x-api-key": secret}, {"Authorization": f"Api-Key {secret}"}):
        async with http.get(f"{gateway.url}{PATH}", headers=headers) as response:
            assert_flowise_error(response.status, await response.json(), 401)
    async with http.get(f"{gateway.url}{PATH}?api_key={secret}") as response:
        assert_flowise_error(response.status, await response.json(), 401)
    status, _ = await get(http, gateway, secret)
    assert status == 200


async def test_each_workspace_sees_only_its_own_keys(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    a = await make_key(scopes=["apikeys:view"], workspace_id="ws-a")
    a2 = await later(make_key, workspace_id="ws-a", user_id=a.record.user_id)
    b = await later(make_key, scopes=["apikeys:view"], workspace_id="ws-b")
    b_other_user = await later(make_key, workspace_id="ws-b")
    _, seen_by_a = await get(http, gateway, a.secret)
    _, seen_by_b = await get(http, gateway, b.secret)
    assert [k["id"] for k in seen_by_a] == [a.record.id, a2.record.id]
    # A workspace listing is every user's keys in it, as in Flowise.
    assert [k["id"] for k in seen_by_b] == [b.record.id, b_other_user.record.id]


async def test_type_organization_lists_every_workspace_for_an_org_admin(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    admin = await make_key(scopes=["apikeys:view", "org:admin"], workspace_id="ws-1")
    others = [await later(make_key, workspace_id=f"ws-{n}") for n in (2, 3, 2)]
    status, body = await get(http, gateway, admin.secret, "?type=organization")
    assert status == 200
    assert [k["id"] for k in body] == [admin.record.id, *(o.record.id for o in others)]
    assert [k["workspaceId"] for k in body] == ["ws-1", "ws-2", "ws-3", "ws-2"]
    status, page = await get(http, gateway, admin.secret, "?type=organization&page=2&limit=3")
    assert status == 200
    assert [k["id"] for k in page] == [others[2].record.id]
    # "*" holds org:admin too; an empty type is no filter at all.
    root = await later(make_key, scopes=["*"], workspace_id="ws-9")
    _, everything = await get(http, gateway, root.secret, "?type=organization")
    assert len(everything) == 5
    _, own = await get(http, gateway, root.secret, "?type=")
    assert [k["id"] for k in own] == [root.record.id]


async def test_type_organization_without_org_admin_is_403(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"])
    status, body = await get(http, gateway, caller.secret, "?type=organization")
    assert_flowise_error(status, body, 403)
    assert "org:admin" in body["message"]


async def test_any_other_type_is_400(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view", "org:admin"])
    for value in ("workspace", "Organization", "org"):
        status, body = await get(http, gateway, caller.secret, f"?type={value}")
        assert_flowise_error(status, body, 400)
        assert "type" in body["message"]


async def test_401_and_403_in_flowise_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    weak = await make_key(scopes=["chatflows:view"])
    async with http.get(f"{gateway.url}{PATH}") as response:
        assert_flowise_error(response.status, await response.json(), 401)
    status, body = await get(http, gateway, "kg_not_a_key")
    assert_flowise_error(status, body, 401)
    status, body = await get(http, gateway, weak.secret)
    assert_flowise_error(status, body, 403)
    assert "apikeys:view" in body["message"]


async def test_pages_split_the_listing_with_a_partial_last_page(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-p")
    for _ in range(4):
        await make_key(workspace_id="ws-p")
    _, everything = await get(http, gateway, caller.secret)
    ids = [k["id"] for k in everything]
    assert len(ids) == 5
    pages = [await get(http, gateway, caller.secret, f"?limit=2&page={n}") for n in (1, 2, 3)]
    assert [status for status, _ in pages] == [200, 200, 200]
    assert [len(body) for _, body in pages] == [2, 2, 1]
    assert [k["id"] for _, body in pages for k in body] == ids
    # Exactly one page: all of it, then nothing.
    assert await get(http, gateway, caller.secret, "?limit=5") == (200, everything)
    assert await get(http, gateway, caller.secret, "?limit=5&page=2") == (200, [])
    # Past the end, however far: an empty array, not an error.
    assert await get(http, gateway, caller.secret, "?page=4&limit=2") == (200, [])
    assert await get(http, gateway, caller.secret, f"?page={'9' * 40}") == (200, [])
    # Empty values and leading zeros read as the defaults and as numbers.
    assert await get(http, gateway, caller.secret, "?page=&limit=") == (200, everything)
    assert await get(http, gateway, caller.secret, "?page=02&limit=002") == (200, pages[1][1])


async def test_bad_page_or_limit_is_400_naming_it(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"])
    for name in ("page", "limit"):
        for value in ("0", "-1", "abc", "1.5", "%201", "1e3", "00"):
            status, body = await get(http, gateway, caller.secret, f"?{name}={value}")
            assert_flowise_error(status, body, 400)
            assert body["message"].startswith(f"{name} ")


async def test_limit_defaults_to_50_and_is_clamped(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"], workspace_id="ws-big")
    for _ in range(MAX_LIMIT // 20):  # in batches: the store's connection pool is bounded
        await asyncio.gather(*(make_key(workspace_id="ws-big") for _ in range(20)))
    status, first = await get(http, gateway, caller.secret)
    assert status == 200 and len(first) == 50
    for huge in (str(MAX_LIMIT + 1), "5000", "9" * 40):
        status, body = await get(http, gateway, caller.secret, f"?limit={huge}")
        assert status == 200 and len(body) == MAX_LIMIT
    _, rest = await get(http, gateway, caller.secret, "?limit=5000&page=2")
    assert len(rest) == 1  # page 2 starts at the clamped limit, not at 5000


async def test_the_path_can_be_moved_or_the_dialect_disabled(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=["apikeys:view"])
    moved = await start_gateway(dialects={"flowise": {"path": "/flowise/api/v1/apikey"}})
    async with http.get(
        f"{moved.url}/flowise/api/v1/apikey", headers=bearer(caller.secret)
    ) as response:
        assert response.status == 200
    off = await start_gateway(dialects={"flowise": {"enabled": False}})
    async with http.get(f"{off.url}{PATH}", headers=bearer(caller.secret)) as response:
        assert response.status == 404  # no dialect, no route: the proxy's own 404
