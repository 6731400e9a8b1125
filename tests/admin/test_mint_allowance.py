"""POST /v1/keys and PATCH /v1/keys/{id} by a key without ``apikeys:*``: no cap looser
than the caller's remaining allowance (docs/management-api.md, "Caps of minted keys").
A looser one is 403 naming its field and saying what is left; a period asked for with no
cap inherits what is left; ``apikeys:*`` and ``org:admin`` are exempt. The caller's spend
goes through the real proxy, on a fixed clock the admin listener's store shares."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.store.keystore import Issued, KeyStore
from gateway.usage.periods import FixedClock, to_ms
from tests.conftest import MakeKey, bearer
from tests.proxy.conftest import (  # noqa: F401  (fixtures)
    Gateway,
    StartGateway,
    cost_upstream_url,
    http,
    serve_app,
    start_gateway,
    upstream,
)

Client = TestClient[Any, Any]
NOON = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
CENT = 10_000  # micro-units: one request to /c/cent
MINTER = ["apikeys:view", "apikeys:create", "apikeys:update", "chat:invoke"]


@pytest.fixture
async def spender(
    start_gateway: StartGateway,  # noqa: F811
    cost_upstream_url: str,  # noqa: F811
    store: KeyStore,
    http: aiohttp.ClientSession,  # noqa: F811
) -> Any:
    """``await spend(secret, tries)``: requests of 0.01 each through a real proxy (reserved
    up front, so a cap admits exactly what it covers); returns how many were admitted."""
    clock = FixedClock(to_ms(NOON))
    store.clock = clock
    route = {
        "name": "cent",
        "path": "/c/cent",
        "upstream": "costs",
        "rewrite": "/flat",
        "cost": {"fixed": CENT / 1_000_000},
    }
    gateway = await start_gateway(
        routes=[route], upstreams={"costs": {"url": cost_upstream_url}}, clock=clock
    )

    async def spend(secret: str | None, tries: int) -> int:
        admitted = 0
        for _ in range(tries):
            async with http.get(f"{gateway.url}/c/cent", headers=bearer(secret)) as response:
                assert response.status in (200, 402), await response.text()
                admitted += response.status == 200
        await gateway.proxy.settlements.drain()
        return admitted

    return spend


async def post(client: Client, creator: Issued, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post("/v1/keys", json=body, headers=bearer(creator.secret))
    return response.status, await response.json(content_type=None)


async def test_a_looser_cap_is_403_naming_the_field_and_the_allowance_left(
    admin_client: Client, make_key: MakeKey, store: KeyStore, spender: Any
) -> None:
    creator = await make_key(scopes=MINTER, limit_micro=5 * CENT, limit_reset="daily")
    assert await spender(creator.secret, 2) == 2  # 0.03 left today
    before = await store.count("ws-a")
    caps = [{"amount": 0.01, "period": "daily"}, {"amount": 0.5, "period": "daily"}]
    status, body = await post(admin_client, creator, {"spend_caps": caps})
    assert status == 403
    assert (body["code"], body["type"]) == ("forbidden", "urn:keygate:error:forbidden")
    assert body["detail"] == (
        "spend_caps[1]: 0.5 daily is above what the caller has left: its remaining daily "
        "allowance is 0.03 (a key without apikeys:* mints keys only within its own caps)"
    )
    assert [e["field"] for e in body["errors"]] == ["spend_caps[1]"]
    assert body["allowance"] == {"daily": 0.03}

    status, body = await post(admin_client, creator, {"limit": 1, "limit_reset": "daily"})
    assert status == 403 and [e["field"] for e in body["errors"]] == ["limit"]
    # A limit over all time is checked against what is left over all time: nothing
    # bounds it here (the creator caps only days), so it is accepted, with the day's room.
    status, body = await post(admin_client, creator, {"limit": 1})
    assert status == 201, body
    assert (body["limit"], body["limit_reset"]) == (1.0, None)
    assert body["spend_caps"] == [{"amount": 0.03, "period": "daily"}]
    assert await store.count("ws-a") == before + 1  # only that one was created


async def test_a_key_asking_no_cap_inherits_what_is_left_and_spends_only_that(
    admin_client: Client, make_key: MakeKey, spender: Any
) -> None:
    creator = await make_key(scopes=MINTER, limit_micro=50 * CENT, limit_reset=None, spend_caps=())
    # 0.50 over all time and, below, 0.04 a day: the child gets both rooms.
    patched = await admin_client.patch(
        f"/v1/keys/{creator.record.id}",
        json={"spend_caps": [{"amount": 0.04, "period": "daily"}]},
        headers=bearer(creator.secret),
    )
    assert patched.status == 200, await patched.text()
    assert await spender(creator.secret, 3) == 3
    status, child = await post(admin_client, creator, {"name": "child"})
    assert status == 201, child
    # The first period inherited becomes the limit; the rest extra caps.
    assert (child["limit"], child["limit_reset"]) == (0.01, "daily")
    assert child["spend_caps"] == [{"amount": 0.47, "period": "total"}]
    assert [(c["name"], c["remaining"]) for c in child["caps"]] == [
        ("limit", 0.01),
        ("spend_caps[0]", 0.47),
    ]
    assert await spender(child["key"], 3) == 1


async def test_a_request_within_the_allowance_is_kept_as_asked(
    admin_client: Client, make_key: MakeKey, spender: Any
) -> None:
    creator = await make_key(scopes=MINTER, limit_micro=5 * CENT, limit_reset="daily")
    body = {
        "limit": 0.02,
        "limit_reset": "daily",
        "spend_caps": [{"amount": 3, "period": "monthly"}],
    }
    status, child = await post(admin_client, creator, body)
    assert status == 201, child
    assert (child["limit"], child["limit_reset"]) == (0.02, "daily")
    assert child["spend_caps"] == [{"amount": 3.0, "period": "monthly"}]
    assert await spender(child["key"], 3) == 2


@pytest.mark.parametrize("scopes", [["apikeys:*"], ["org:admin"], ["*"]])
async def test_apikeys_star_and_org_admin_are_exempt(
    admin_client: Client, make_key: MakeKey, spender: Any, scopes: list[str]
) -> None:
    creator = await make_key(scopes=scopes, limit_micro=5 * CENT, limit_reset="daily")
    assert await spender(creator.secret, 5) == 5  # nothing left today
    status, child = await post(admin_client, creator, {"limit": 100, "limit_reset": "daily"})
    assert status == 201, child
    assert (child["limit"], child["spend_caps"]) == (100.0, [])
    status, child = await post(admin_client, creator, {})
    assert status == 201 and (child["limit"], child["spend_caps"]) == (None, [])


async def test_a_creator_without_caps_imposes_none(admin_client: Client, make_key: MakeKey) -> None:
    creator = await make_key(scopes=MINTER)
    status, child = await post(admin_client, creator, {})
    assert status == 201 and (child["limit"], child["spend_caps"]) == (None, [])
    status, child = await post(admin_client, creator, {"limit": 1000, "limit_reset": "daily"})
    assert status == 201 and child["limit"] == 1000.0


async def test_import_is_bounded_like_create(admin_client: Client, make_key: MakeKey) -> None:
    creator = await make_key(scopes=MINTER, limit_micro=5 * CENT, limit_reset="weekly")
    secret = "legacy-secret-0123456789"
    response = await admin_client.post(
        "/v1/keys/import",
        json={"key": secret, "limit": 1, "limit_reset": "weekly"},
        headers=bearer(creator.secret),
    )
    assert response.status == 403
    assert (await response.json())["errors"][0]["field"] == "limit"
    response = await admin_client.post(
        "/v1/keys/import", json={"key": secret}, headers=bearer(creator.secret)
    )
    assert response.status == 201
    imported = await response.json()
    assert (imported["limit"], imported["limit_reset"]) == (0.05, "weekly")


async def test_byok_counting_is_inherited_and_cannot_be_dropped(
    admin_client: Client, make_key: MakeKey
) -> None:
    creator = await make_key(
        scopes=MINTER, limit_micro=5 * CENT, limit_reset="daily", include_byok_in_limit=True
    )
    status, body = await post(admin_client, creator, {"include_byok_in_limit": False})
    assert status == 403 and [e["field"] for e in body["errors"]] == ["include_byok_in_limit"]
    status, child = await post(admin_client, creator, {})
    assert status == 201 and child["include_byok_in_limit"] is True


# --- PATCH: the caller is the creator ------------------------------------------------------


async def test_patch_cannot_raise_a_cap_past_the_callers_allowance(
    admin_client: Client, make_key: MakeKey, store: KeyStore, spender: Any
) -> None:
    creator = await make_key(scopes=MINTER, limit_micro=5 * CENT, limit_reset="daily")
    assert await spender(creator.secret, 1) == 1  # 0.04 left
    status, child = await post(admin_client, creator, {"limit": 0.01, "limit_reset": "daily"})
    assert status == 201
    url = f"/v1/keys/{child['id']}"

    async def patch(secret: str | None, body: dict[str, Any], target: str = url) -> Any:
        response = await admin_client.patch(target, json=body, headers=bearer(secret))
        return response.status, await response.json(content_type=None)

    status, body = await patch(creator.secret, {"limit": 5})
    assert status == 403 and body["errors"][0]["field"] == "limit"
    assert "remaining daily allowance is 0.04" in body["detail"]
    status, body = await patch(creator.secret, {"spend_caps": [{"amount": 0.5, "period": "daily"}]})
    assert status == 403 and body["errors"][0]["field"] == "spend_caps[0]"
    record = await store.get(child["id"])
    assert record is not None and record.limit_micro == 1 * CENT  # unchanged

    # Within the allowance it is accepted; dropping the limit leaves the allowance.
    status, body = await patch(creator.secret, {"limit": 0.04})
    assert (status, body["limit"]) == (200, 0.04)
    status, body = await patch(creator.secret, {"limit": None})
    assert status == 200, body
    assert (body["limit"], body["spend_caps"]) == (None, [{"amount": 0.04, "period": "daily"}])
    # A change of no cap is never refused for a cap it leaves alone.
    status, body = await patch(creator.secret, {"name": "renamed"})
    assert status == 200

    # Nor can a key raise its own cap.
    status, body = await patch(creator.secret, {"limit": 1}, f"/v1/keys/{creator.record.id}")
    assert status == 403 and body["errors"][0]["field"] == "limit"
    own = await store.get(creator.record.id)
    assert own is not None and own.limit_micro == 5 * CENT

    # An apikeys:* key of the workspace may.
    admin = await make_key(scopes=["apikeys:*"])
    status, body = await patch(admin.secret, {"limit": 5})
    assert (status, body["limit"]) == (200, 5.0)
