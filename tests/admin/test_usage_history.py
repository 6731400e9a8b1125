"""GET /v1/keys/{id}/usage: usage per day, ISO week and month for charts; and the derived
usage fields on the records the management API returns.

Usage buckets are written straight into Redis, under the names the gateway's scripts use
(``<prefix>u:{<id>}:d:20261120``, ``bd:...`` for BYOK), and the store's clock is fixed.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from typing import Any

import jsonschema_rs
import pytest
from aiohttp.test_utils import TestClient

from gateway.admin.openapi import document
from gateway.store.keystore import KeyStore
from gateway.store.record import RateLimitSpec, SpendCap
from gateway.usage.periods import FixedClock, to_ms
from tests.conftest import MakeKey, bearer

Client = TestClient[Any, Any]
NOW = datetime(2026, 11, 22, 14, 3, 7, 512000, tzinfo=UTC)  # a Sunday, in 2026-W47

# bucket -> micro-units; every one inside the window except where noted.
WRITTEN = {
    "d:20261122": 1_500_000,  # today: the last daily point
    "bd:20261122": 250_000,
    "d:20261120": 2_000_000,
    "d:20260825": 3_000_000,  # the oldest day shown (today - 89 days)
    "d:20260824": 9_000_000,  # one day too old: not shown
    "bd:20261001": 125_000,  # BYOK only, on a day without other usage
    "w:2026W47": 4_000_000,  # this week
    "bw:2026W46": 700_000,
    "w:2026W22": 1,  # the oldest week shown: one micro-unit
    "w:2026W21": 9_000_000,  # too old
    "m:202611": 5_000_000,  # this month
    "bm:202610": 800_000,
    "m:202412": 6_000_000,  # the oldest month shown
    "m:202411": 9_000_000,  # too old
    "d:20261123": 9_000_000,  # tomorrow: not yet
    "t": 99_000_000,  # totals are not periods
    "bt": 99_000_000,
}
# label -> (usage, byok_usage) in credits; every other point is zero.
EXPECTED = {
    "daily": {
        "2026-11-22": (1.5, 0.25),
        "2026-11-20": (2.0, 0.0),
        "2026-08-25": (3.0, 0.0),
        "2026-10-01": (0.0, 0.125),
    },
    "weekly": {"2026-W47": (4.0, 0.0), "2026-W46": (0.0, 0.7), "2026-W22": (0.000001, 0.0)},
    "monthly": {"2026-11": (5.0, 0.0), "2026-10": (0.0, 0.8), "2024-12": (6.0, 0.0)},
}


async def _write(store: KeyStore, key_id: str, buckets: dict[str, int]) -> None:
    await store.client.mset({store.names.usage(key_id, b): v for b, v in buckets.items()})


@pytest.fixture
async def viewer(make_key: MakeKey, store: KeyStore) -> str:
    """A workspace ws-a key with apikeys:view; the store's clock fixed at NOW."""
    store.clock = FixedClock(to_ms(NOW))
    issued = await make_key(name="viewer", scopes=["apikeys:view"], workspace_id="ws-a")
    assert issued.secret
    return issued.secret


async def _usage(client: Client, key_id: str, secret: str) -> dict[str, Any]:
    response = await client.get(f"/v1/keys/{key_id}/usage", headers=bearer(secret))
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    return body


async def test_usage_lands_on_its_day_week_and_month(
    admin_client: Client, make_key: MakeKey, store: KeyStore, viewer: str
) -> None:
    target = (await make_key(name="charted")).record.id
    other = (await make_key(name="other")).record.id
    await _write(store, target, WRITTEN)
    await _write(store, other, {"d:20261121": 42_000_000, "w:2026W45": 42_000_000})

    body = await _usage(admin_client, target, viewer)
    assert set(body) == {"key_id", "now", "daily", "weekly", "monthly"}
    assert body["key_id"] == target and body["now"] == "2026-11-22T14:03:07.512Z"
    for period, expected in EXPECTED.items():
        points = body[period]
        found = {
            p["period"]: (p["usage"], p["byok_usage"])
            for p in points
            if p["usage"] or p["byok_usage"]
        }
        assert found == expected, period
        assert all(set(p) == {"period", "start", "end", "usage", "byok_usage"} for p in points)
        assert all(type(p["usage"]) in (int, float) for p in points)
    assert body["daily"][-1]["period"] == "2026-11-22"


async def test_series_are_90_26_24_contiguous_oldest_first(
    admin_client: Client, make_key: MakeKey, viewer: str
) -> None:
    target = (await make_key()).record.id
    body = await _usage(admin_client, target, viewer)
    days, weeks, months = body["daily"], body["weekly"], body["monthly"]
    assert (len(days), len(weeks), len(months)) == (90, 26, 24)
    assert all(p["usage"] == 0 and p["byok_usage"] == 0 for p in days + weeks + months)

    first_day = date(2026, 11, 22) - timedelta(days=89)
    assert [p["period"] for p in days] == [
        (first_day + timedelta(days=i)).isoformat() for i in range(90)
    ]
    assert days[-1] == {
        "period": "2026-11-22",
        "start": "2026-11-22T00:00:00.000Z",
        "end": "2026-11-23T00:00:00.000Z",
        "usage": 0,
        "byok_usage": 0,
    }
    assert [weeks[0]["period"], weeks[-1]["period"]] == ["2026-W22", "2026-W47"]
    assert (weeks[-1]["start"], weeks[-1]["end"]) == (
        "2026-11-16T00:00:00.000Z",
        "2026-11-23T00:00:00.000Z",
    )
    assert [months[0]["period"], months[-1]["period"]] == ["2024-12", "2026-11"]
    assert (months[-1]["start"], months[-1]["end"]) == (
        "2026-11-01T00:00:00.000Z",
        "2026-12-01T00:00:00.000Z",
    )
    for series in (days, weeks, months):
        assert len({p["period"] for p in series}) == len(series)
        for earlier, later in pairwise(series):
            assert earlier["end"] == later["start"]  # no gap, no overlap
            assert earlier["period"] < later["period"]


def _conforms(body: Any, schema_name: str) -> None:
    """``body`` matches the schema the OpenAPI document gives it."""
    doc = document()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    jsonschema_rs.Draft202012Validator(schema).validate(body)


async def test_the_usage_and_the_record_are_as_documented(
    admin_client: Client, make_key: MakeKey, store: KeyStore, viewer: str
) -> None:
    target = await make_key(
        limit_micro=10_000_000,
        limit_reset="daily",
        rate_limit=RateLimitSpec(5, 60.0),
        spend_caps=(SpendCap(3_000_000, "weekly"),),
    )
    await _write(store, target.record.id, WRITTEN)
    _conforms(await _usage(admin_client, target.record.id, viewer), "UsageHistory")
    shown = await admin_client.get(f"/v1/keys/{target.record.id}", headers=bearer(viewer))
    _conforms(await shown.json(), "Key")


async def test_iso_week_53_and_the_new_year(
    admin_client: Client, make_key: MakeKey, store: KeyStore, viewer: str
) -> None:
    store.clock = FixedClock(to_ms(datetime(2027, 1, 2, 23, 59, tzinfo=UTC)))
    target = (await make_key()).record.id
    await _write(store, target, {"w:2026W53": 2_000_000, "m:202701": 3_000_000})
    body = await _usage(admin_client, target, viewer)
    assert body["weekly"][-1] == {
        "period": "2026-W53",
        "start": "2026-12-28T00:00:00.000Z",
        "end": "2027-01-04T00:00:00.000Z",
        "usage": 2.0,
        "byok_usage": 0,
    }
    assert body["weekly"][-2]["period"] == "2026-W52"
    assert body["monthly"][-1]["period"] == "2027-01" and body["monthly"][-1]["usage"] == 3.0
    assert body["daily"][-1]["period"] == "2027-01-02"


async def test_now_is_the_redis_server_clock_without_a_fixed_clock(
    admin_client: Client, make_key: MakeKey, store: KeyStore, viewer: str
) -> None:
    store.clock = lambda: ""  # the server's TIME, as in production
    target = (await make_key()).record.id
    before = await store.server_time_ms()
    body = await _usage(admin_client, target, viewer)
    after = await store.server_time_ms()
    now = datetime.fromisoformat(body["now"])
    assert before <= to_ms(now) <= after
    assert body["daily"][-1]["period"] == now.date().isoformat()


async def test_no_key_is_401_and_a_bad_key_is_401(admin_client: Client, make_key: MakeKey) -> None:
    target = (await make_key()).record.id
    missing = await admin_client.get(f"/v1/keys/{target}/usage")
    assert missing.status == 401 and missing.content_type == "application/problem+json"
    assert (await missing.json())["code"] == "missing_key"
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="keygate"'
    bad = await admin_client.get(f"/v1/keys/{target}/usage", headers=bearer("kg_nope"))
    assert bad.status == 401 and (await bad.json())["code"] == "invalid_key"


async def test_a_key_without_apikeys_view_is_403(admin_client: Client, make_key: MakeKey) -> None:
    target = (await make_key()).record.id
    weak = (await make_key(scopes=["chat:invoke", "apikeys:create"])).secret
    response = await admin_client.get(f"/v1/keys/{target}/usage", headers=bearer(weak))
    assert response.status == 403 and response.content_type == "application/problem+json"
    assert (await response.json())["code"] == "forbidden_scope"
    assert 'scope="apikeys:view"' in response.headers["WWW-Authenticate"]


async def test_unknown_malformed_revoked_and_other_workspace_ids_are_404(
    admin_client: Client, make_key: MakeKey, store: KeyStore, viewer: str
) -> None:
    theirs = await make_key(workspace_id="ws-b")
    await _write(store, theirs.record.id, {"d:20261122": 1_000_000})
    revoked = (await make_key()).record.id
    assert await store.revoke(revoked)
    for key_id in (str(uuid.uuid4()), "not-a-uuid", revoked, theirs.record.id):
        response = await admin_client.get(f"/v1/keys/{key_id}/usage", headers=bearer(viewer))
        assert response.status == 404, key_id
        assert response.content_type == "application/problem+json"
        body = await response.json()
        assert (body["status"], body["code"]) == (404, "not_found")
        assert body["detail"] == "no API key with this id"  # the same for every case

    org = (await make_key(scopes=["org:admin"], workspace_id="ws-a")).secret
    assert org
    seen = await _usage(admin_client, theirs.record.id, org)
    assert seen["daily"][-1]["usage"] == 1.0


async def test_a_disabled_key_still_has_its_history(
    admin_client: Client, make_key: MakeKey, store: KeyStore, viewer: str
) -> None:
    target = (await make_key(disabled=True)).record.id
    await _write(store, target, {"m:202611": 2_500_000})
    body = await _usage(admin_client, target, viewer)
    assert body["monthly"][-1]["usage"] == 2.5


async def test_records_carry_the_derived_usage_fields(
    admin_client: Client, make_key: MakeKey, store: KeyStore, viewer: str
) -> None:
    target = (
        await make_key(name="metered", limit_micro=10_000_000, limit_reset="monthly")
    ).record.id
    await _write(store, target, WRITTEN)
    expected = {
        "usage": 99.0,
        "usage_daily": 1.5,
        "usage_weekly": 4.0,
        "usage_monthly": 5.0,
        "byok_usage": 99.0,
        "byok_usage_daily": 0.25,
        "byok_usage_weekly": 0.0,
        "byok_usage_monthly": 0.0,
        "limit_remaining": 5.0,  # 10 per month, 5 used this month
        "usage_resets_at": {
            "daily": "2026-11-23T00:00:00.000Z",
            "weekly": "2026-11-23T00:00:00.000Z",
            "monthly": "2026-12-01T00:00:00.000Z",
        },
    }

    shown = await admin_client.get(f"/v1/keys/{target}", headers=bearer(viewer))
    assert shown.status == 200
    record = await shown.json()
    assert {name: record[name] for name in expected} == expected
    assert record["caps"] == [
        {
            "name": "limit",
            "amount": 10.0,
            "period": "monthly",
            "used": 5.0,
            "remaining": 5.0,
            "resets_at": "2026-12-01T00:00:00.000Z",
        }
    ]
    assert record["rate_limit_state"] is None

    listed = await admin_client.get("/v1/keys?limit=1000", headers=bearer(viewer))
    assert listed.status == 200
    by_id = {k["id"]: k for k in (await listed.json())["data"]}
    # A listing leaves out the ledger's requests in flight (one key's answers only).
    assert by_id[target] == {k: v for k, v in record.items() if k not in ("in_flight", "reserved")}
    assert all("usage_daily" in k for k in by_id.values())
