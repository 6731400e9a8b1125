"""OpenRouter's ``/api/v1/keys`` (seeds/openrouter-list-api-keys.txt), driven with raw HTTP
and with the official SDK (``openrouter``): the caller's workspace keys in the seed's
shape, 100 a page by ``offset``, the provisioning endpoints, and ``GET /api/v1/key``."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from openrouter import OpenRouter, errors
from openrouter.utils import BackoffStrategy, RetryConfig
from redis.asyncio import Redis

from gateway.store.keystore import Issued, KeyStore
from gateway.store.record import KeyRecord
from tests.conftest import MakeKey
from tests.proxy.conftest import Gateway, StartGateway, sha256_hex

LIST = "/api/v1/keys"
SEED = Path("/work/shared/seeds/openrouter-list-api-keys.txt")
# Fields the SDK's response models require beyond the seed's (served from the record).
SDK_EXTRAS = {"creator_user_id", "external_user", "last_used_at", "workspace_id"}
VIEWER = ["apikeys:view"]
MANAGER = ["apikeys:view", "apikeys:create", "apikeys:update", "apikeys:delete"]


def seed_schema() -> dict[str, Any]:
    """The seed's 200 schema, with its component references resolvable."""
    text = SEED.read_text()
    spec = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    schemas = spec["components"]["schemas"]
    return {**schemas["API Keys_list_Response_200"], "components": spec["components"]}


SCHEMA = seed_schema()
SEED_FIELDS = set(
    SCHEMA["components"]["schemas"]["KeysGetResponsesContentApplicationJsonSchemaDataItems"][
        "properties"
    ]
)


def sdk(gateway: Gateway, secret: str | None) -> OpenRouter:
    """The official client pointed at keygate, with retries off so a 5xx fails fast."""
    return OpenRouter(
        api_key=secret,
        server_url=f"{gateway.url}/api/v1",
        retry_config=RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), False),
    )


async def get(http: aiohttp.ClientSession, url: str, secret: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    async with http.get(url, headers=headers) as response:
        return response.status, await response.json()


def key_hash(record: KeyRecord) -> str:
    """The hash keygate serves for a key: its id's 32 hex digits (docs/dialects.md)."""
    return record.id.replace("-", "")


def ordered(keys: list[Issued]) -> list[str]:
    """Hashes in listing order: creation time, then id (keys made in one millisecond)."""
    return [key_hash(k.record) for k in sorted(keys, key=lambda k: k.record.index_member())]


def assert_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert set(body) == {"error"}
    assert body["error"]["code"] == expected
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# --- listing -----------------------------------------------------------------------------


async def test_lists_the_workspace_in_the_seed_shape(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    make_key: MakeKey,
    store: KeyStore,
    redis: Redis,
) -> None:
    caller = await make_key(name="lister", scopes=VIEWER, workspace_id="ws-or")
    expires = int(time.time() * 1000) + 86_400_000
    capped = await make_key(
        name="capped",
        workspace_id="ws-or",
        limit_micro=10_000_000,
        limit_reset="monthly",
        include_byok_in_limit=True,
        expires_at=expires,
    )
    colleague = await make_key(workspace_id="ws-or")  # another user of the same workspace
    off = await make_key(name="off", workspace_id="ws-or", disabled=True)
    await make_key(name="elsewhere", workspace_id="ws-other")
    await redis.set(store.names.usage(capped.record.id, "t"), 2_500_000)

    status, body = await get(http, f"{gateway.url}{LIST}", caller.secret)
    assert status == 200
    jsonschema.validate(body, SCHEMA)
    keys = {k["hash"]: k for k in body["data"]}
    # Oldest first; disabled keys only when asked for; never another workspace's.
    assert list(keys) == ordered([caller, capped, colleague])
    for key in keys.values():
        assert set(key) == SEED_FIELDS | SDK_EXTRAS
    item = keys[key_hash(capped.record)]
    assert item["name"] == "capped" and item["label"] == capped.record.label
    assert item["limit"] == 10.0 and item["limit_reset"] == "monthly"
    assert item["include_byok_in_limit"] is True
    assert item["usage"] == 2.5 and item["limit_remaining"] == 10.0  # no monthly spend yet
    assert item["expires_at"].endswith("Z") and item["created_at"].endswith("Z")
    assert item["workspace_id"] == "ws-or"
    assert item["creator_user_id"] == capped.record.user_id
    assert keys[key_hash(colleague.record)]["name"] == ""  # unnamed: the seed's name is a string

    status, body = await get(http, f"{gateway.url}{LIST}?include_disabled=true", caller.secret)
    jsonschema.validate(body, SCHEMA)
    assert [k["hash"] for k in body["data"]] == ordered([caller, capped, colleague, off])
    assert [k["disabled"] for k in body["data"] if k["hash"] == key_hash(off.record)] == [True]
    text = str(body)
    for issued in (caller, capped, colleague, off):
        assert issued.secret is not None and issued.secret not in text


async def test_paging_edges(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=VIEWER, workspace_id="ws-p")
    url = f"{gateway.url}{LIST}"
    # The smallest workspace a caller can list holds only the caller; past it, [].
    assert [k["hash"] for k in (await get(http, url, caller.secret))[1]["data"]] == [
        key_hash(caller.record)
    ]
    assert (await get(http, f"{url}?offset=1", caller.secret))[1] == {"data": []}
    made = [caller] + [await make_key(workspace_id="ws-p") for _ in range(99)]
    hashes = ordered(made)

    status, body = await get(http, f"{url}?offset=0", caller.secret)  # exactly one page
    assert status == 200 and [k["hash"] for k in body["data"]] == hashes
    assert (await get(http, f"{url}?offset=100", caller.secret))[1] == {"data": []}
    made += [await make_key(workspace_id="ws-p") for _ in range(30)]
    status, body = await get(http, f"{url}?offset=100", caller.secret)  # last partial page
    assert [k["hash"] for k in body["data"]] == ordered(made)[100:]
    status, body = await get(http, f"{url}?offset=125", caller.secret)
    assert len(body["data"]) == 5
    assert (await get(http, f"{url}?offset=1000", caller.secret))[1] == {"data": []}

    for bad in ("-1", "abc", "1.5", "", "%201", "99999999999999999999"):
        status, body = await get(http, f"{url}?offset={bad}", caller.secret)
        assert_error(status, body, 400)
        assert "offset" in body["error"]["message"]
    status, body = await get(http, f"{url}?include_disabled=yes", caller.secret)
    assert_error(status, body, 400)


async def test_sdk_pages_exactly_while_keys_are_created_and_revoked(
    gateway: Gateway, make_key: MakeKey, store: KeyStore
) -> None:
    """Offsets count keys oldest first, so a key created between pages sorts after every
    listed one and never shifts a page; revoking a key not yet listed shifts nothing
    listed either. A caller pages with the SDK as OpenRouter documents: offset += len."""
    caller = await make_key(scopes=VIEWER, workspace_id="ws-x")
    originals = [caller] + [await make_key(workspace_id="ws-x") for _ in range(149)]
    client = sdk(gateway, caller.secret)
    seen: list[str] = []
    first = await client.api_keys.list_async()
    seen += [k.hash for k in first.data]
    assert len(first.data) == 100
    fresh = [await make_key(workspace_id="ws-x") for _ in range(3)]
    doomed = next(k for k in originals if key_hash(k.record) == ordered(originals)[120])
    assert await store.revoke(doomed.record.id)
    offset = len(seen)
    while True:
        page = await client.api_keys.list_async(offset=offset)
        if not page.data:
            break
        seen += [k.hash for k in page.data]
        offset += len(page.data)
    assert len(seen) == len(set(seen))  # nothing twice
    survivors = [h for h in ordered(originals) if h != key_hash(doomed.record)]
    assert seen == survivors + ordered(fresh)  # nothing skipped, in order


async def test_revoking_a_listed_key_shifts_later_offsets_by_one(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    """The known limit of plain offsets (OpenRouter's own semantics): once a key of an
    earlier page is revoked, the next offset starts one key later. The store keeps no
    tombstones, so keygate cannot tell; callers that must not miss a key re-list."""
    caller = await make_key(scopes=VIEWER, workspace_id="ws-s")
    keys = [caller] + [await make_key(workspace_id="ws-s") for _ in range(101)]
    url = f"{gateway.url}{LIST}"
    first = (await get(http, url, caller.secret))[1]["data"]
    fifth = next(k for k in keys if key_hash(k.record) == ordered(keys)[5])
    assert await store.revoke(fifth.record.id)
    second = (await get(http, f"{url}?offset={len(first)}", caller.secret))[1]["data"]
    # The 101st key moved back onto the first page: only the 102nd is left to see.
    assert [k["hash"] for k in second] == ordered(keys)[101:]


# --- the provisioning endpoints with the SDK -------------------------------------------------


async def test_sdk_round_trip(
    gateway: Gateway, make_key: MakeKey, store: KeyStore, redis: Redis
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-r")
    client = sdk(gateway, caller.secret)
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    created = await client.api_keys.create_async(
        name="ci", limit=5, limit_reset="monthly", include_byok_in_limit=True, expires_at=expires
    )
    assert created.key.startswith("kg_")
    # The hash names the key by its id: nothing of the secret, not even its sha256.
    key_id = await redis.get(store.names.by_hash(sha256_hex(created.key)))
    assert created.data.hash == str(key_id).replace("-", "")
    assert created.data.limit == 5 and created.data.limit_remaining == 5
    assert created.data.expires_at == expires
    record = await store.get(str(key_id))
    assert record is not None
    assert (record.workspace_id, record.user_id) == ("ws-r", caller.record.user_id)
    assert record.scopes == () and record.limit_micro == 5_000_000
    assert created.key not in str(record.to_json(0))

    listed = await client.api_keys.list_async()
    assert created.data.hash in [k.hash for k in listed.data]
    synchronous = await asyncio.to_thread(client.api_keys.list)  # the sync client too
    assert [k.hash for k in synchronous.data] == [k.hash for k in listed.data]
    fetched = await client.api_keys.get_async(hash=created.data.hash)
    assert fetched.data.name == "ci" and fetched.data.label == record.label

    updated = await client.api_keys.update_async(
        hash=created.data.hash, name="ci-2", disabled=True, limit=None, limit_reset=None
    )
    assert (updated.data.name, updated.data.disabled, updated.data.limit) == ("ci-2", True, None)
    assert created.data.hash not in [k.hash for k in (await client.api_keys.list_async()).data]
    with_disabled = await client.api_keys.list_async(include_disabled=True)
    assert created.data.hash in [k.hash for k in with_disabled.data]

    deleted = await client.api_keys.delete_async(hash=created.data.hash)
    assert deleted.DELETED is True
    assert await redis.get(store.names.by_hash(sha256_hex(created.key))) is None
    with pytest.raises(errors.NotFoundResponseError) as missing:
        await client.api_keys.get_async(hash=created.data.hash)
    assert missing.value.data.error.code == 404


async def test_other_workspaces_keys_are_404_and_untouched(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-i")
    theirs = await make_key(name="theirs", workspace_id="ws-j")
    url = f"{gateway.url}{LIST}/{key_hash(theirs.record)}"
    headers = {"Authorization": f"Bearer {caller.secret}"}
    for method, body in (("GET", None), ("PATCH", {"disabled": True}), ("DELETE", None)):
        async with http.request(method, url, headers=headers, json=body) as response:
            assert_error(response.status, await response.json(), 404)
    assert await store.get(theirs.record.id) == theirs.record  # unchanged
    mine = key_hash(caller.record)
    for path in ("not-a-hash", "0" * 64, "0" * 32, mine.upper(), f"{mine}0"):
        status, body = await get(http, f"{gateway.url}{LIST}/{path}", caller.secret)
        assert_error(status, body, 404)
    status, body = await get(http, f"{gateway.url}{LIST}?workspace_id=ws-j", caller.secret)
    assert_error(status, body, 403)
    client = sdk(gateway, caller.secret)
    with pytest.raises(errors.ForbiddenResponseError):
        await client.api_keys.create_async(name="x", workspace_id="ws-j")
    assert await store.count("ws-j") == 1


async def test_a_key_cannot_manage_a_more_powerful_one(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-m")
    admin = await make_key(scopes=["*"], workspace_id="ws-m")
    headers = {"Authorization": f"Bearer {caller.secret}"}
    url = f"{gateway.url}{LIST}/{key_hash(admin.record)}"
    async with http.delete(url, headers=headers) as response:
        assert_error(response.status, await response.json(), 403)
    async with http.patch(url, headers=headers, json={"disabled": True}) as response:
        assert_error(response.status, await response.json(), 403)
    assert await store.get(admin.record.id) == admin.record


async def test_bad_create_and_update_bodies_are_400(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    caller = await make_key(scopes=MANAGER, workspace_id="ws-b")
    target = await make_key(workspace_id="ws-b")
    headers = {"Authorization": f"Bearer {caller.secret}"}
    for body in (
        {},
        {"name": ""},
        {"name": "x", "limit": -1},
        {"name": "x", "limit_reset": "yearly"},
        {"name": "x", "external": {"user": "u"}},
        {"name": "x", "expires_at": "2001-01-01T00:00:00Z"},
        [1, 2],
    ):
        async with http.post(f"{gateway.url}{LIST}", headers=headers, json=body) as response:
            assert_error(response.status, await response.json(), 400)
    async with http.post(f"{gateway.url}{LIST}", headers=headers, data=b"{no") as response:
        assert_error(response.status, await response.json(), 400)
    for body in ({}, {"name": None}, {"scopes": ["*"]}):
        async with http.patch(
            f"{gateway.url}{LIST}/{key_hash(target.record)}", headers=headers, json=body
        ) as response:
            assert_error(response.status, await response.json(), 400)
    assert await store.count("ws-b") == 2


async def test_the_hash_reveals_nothing_of_the_secret_and_names_the_key_for_every_call(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, store: KeyStore
) -> None:
    """OpenRouter's hash is the sha256 of the secret; served to every apikeys:view key,
    that sha256 gives a short imported secret away offline. keygate's names the key by its
    id instead, and the secret's sha256 names nothing."""
    caller = await make_key(scopes=MANAGER, workspace_id="ws-h")
    secret = "sk-legacy-0123456789"
    imported = await store.create(
        {"workspace_id": "ws-h", "user_id": caller.record.user_id, "name": "legacy"},
        secret=secret,
    )
    digest = sha256_hex(secret)
    headers = {"Authorization": f"Bearer {caller.secret}"}
    async with http.get(f"{gateway.url}{LIST}", headers=headers) as response:
        text = await response.text()
        listed = {k["name"]: k["hash"] for k in (await response.json())["data"]}
    assert digest not in text and key_hash(caller.record) in text
    assert listed["legacy"] == key_hash(imported.record)
    url = f"{gateway.url}{LIST}/{listed['legacy']}"
    status, body = await get(http, url, caller.secret)
    assert status == 200 and body["data"]["name"] == "legacy" and digest not in str(body)
    async with http.patch(url, headers=headers, json={"name": "renamed"}) as response:
        assert response.status == 200 and digest not in await response.text()
    status, body = await get(http, f"{gateway.url}{LIST}/{digest}", caller.secret)
    assert_error(status, body, 404)  # the secret's sha256 names no key
    async with http.delete(url, headers=headers) as response:
        assert response.status == 200
    assert await store.get(imported.record.id) is None


# --- refusals ----------------------------------------------------------------------------


async def test_401_and_403_in_openrouter_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    weak = await make_key(scopes=["chat:invoke"])
    viewer = await make_key(scopes=VIEWER)
    url = f"{gateway.url}{LIST}"
    for secret, expected in ((None, 401), ("kg_not_a_key", 401), (weak.secret, 403)):
        status, body = await get(http, url, secret)
        assert_error(status, body, expected)
    headers = {"Authorization": f"Bearer {viewer.secret}"}
    async with http.post(url, headers=headers, json={"name": "x"}) as response:
        assert_error(response.status, await response.json(), 403)  # needs apikeys:create
    with pytest.raises(errors.UnauthorizedResponseError) as refused:
        await sdk(gateway, "kg_not_a_key").api_keys.list_async()
    assert refused.value.data.error.code == 401


# --- GET /api/v1/key -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK's legacy rate_limit
async def test_current_key_in_the_sdk_shape(
    gateway: Gateway, make_key: MakeKey, store: KeyStore, redis: Redis
) -> None:
    caller = await make_key(
        name="me",
        scopes=["*"],
        limit_micro=4_000_000,
        limit_reset="daily",
    )
    await redis.set(store.names.usage(caller.record.id, "t"), 1_000_000)
    reply = await sdk(gateway, caller.secret).api_keys.get_current_key_metadata_async()
    data = reply.data
    assert data.label == caller.record.label
    assert (data.limit, data.limit_reset, data.usage) == (4.0, "daily", 1.0)
    assert data.limit_remaining == 4.0  # today's spend counts against a daily limit
    assert data.is_free_tier is False and data.is_management_key is True
    assert data.workspace_id == caller.record.workspace_id
    assert [b.scope for b in data.budgets] == ["key_limit"]
    assert data.effective_budget is not None and data.effective_budget.limit_usd == 4.0


async def test_any_valid_key_reads_itself_without_scopes(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    """Scope "" on this endpoint: mount.py checks no scope, so a bare key passes."""
    bare = await make_key(name="bare")  # no scopes at all
    moved = await start_gateway(dialects={"openrouter": {"path": "/or/api/v1/keys"}})
    status, body = await get(http, f"{moved.url}/or/api/v1/key", bare.secret)
    assert status == 200, body
    assert body["data"]["label"] == bare.record.label
    assert body["data"]["is_management_key"] is False
    assert "hash" not in body["data"]  # OpenRouter's current-key shape names no hash
    assert bare.secret not in str(body)


async def test_the_path_can_be_moved_or_the_dialect_disabled(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=VIEWER)
    moved = await start_gateway(dialects={"openrouter": {"path": "/or/api/v1/keys"}})
    status, _ = await get(http, f"{moved.url}/or/api/v1/keys", caller.secret)
    assert status == 200
    one = f"{moved.url}/or/api/v1/keys/{key_hash(caller.record)}"
    status, _ = await get(http, one, caller.secret)
    assert status == 200
    off = await start_gateway(dialects={"openrouter": {"enabled": False}})
    async with http.get(
        f"{off.url}{LIST}", headers={"Authorization": f"Bearer {caller.secret}"}
    ) as response:
        assert response.status == 404  # no dialect, no route: the proxy's own 404
