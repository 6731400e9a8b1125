"""KeyStore against a real Redis: what is stored, and what each operation changes."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from gateway.store import secrets
from gateway.store.keystore import BadCursor, KeyExists, KeyStore
from gateway.store.record import MICRO
from tests.conftest import MakeKey


async def _everything_stored(redis: Redis, prefix: str) -> str:
    """Every key name and value under ``prefix``, as one text: what a dump would show."""
    parts: list[str] = []
    async for name in redis.scan_iter(match=f"{prefix}*"):
        parts.append(name)
        kind = await redis.type(name)
        if kind == "hash":
            parts.extend(f"{k}={v}" for k, v in (await redis.hgetall(name)).items())
        elif kind == "string":
            parts.append(str(await redis.get(name)))
        elif kind == "zset":
            parts.extend(await redis.zrange(name, 0, -1))
    return "\n".join(parts)


async def test_create_stores_the_hash_and_indexes_never_the_secret(
    store: KeyStore, redis: Redis, make_key: MakeKey, key_prefix: str
) -> None:
    issued = await make_key(name="ci", scopes=["chat:invoke"], limit_micro=5 * MICRO)
    assert issued.secret is not None
    digest = secrets.hash_secret(issued.secret)
    assert await redis.get(f"{key_prefix}h:{digest}") == issued.record.id
    stored = await redis.hgetall(f"{key_prefix}k:{{{issued.record.id}}}")
    assert stored["hash"] == digest
    assert stored["limit_micro"] == str(5 * MICRO)
    member = issued.record.index_member()
    assert await redis.zscore(f"{key_prefix}ws:ws-a", member) == 0
    assert await redis.zscore(f"{key_prefix}org", member) == 0
    assert issued.secret not in await _everything_stored(redis, key_prefix)


async def test_a_full_dump_holds_no_secret_after_create_import_and_rotate(
    store: KeyStore, redis: Redis, make_key: MakeKey, key_prefix: str
) -> None:
    created = await make_key(name="a")
    short = "legacy-9f"  # a short imported secret: masks must not reveal it
    imported = await store.create(
        {"workspace_id": "ws-a", "user_id": str(uuid.uuid4())}, secret=short + "xyz1"
    )
    rotated = await store.rotate(created.record.id, grace_seconds=60)
    assert rotated is not None and rotated.secret
    dump = await _everything_stored(redis, key_prefix)
    for secret in (created.secret, rotated.secret, short + "xyz1"):
        assert secret and secret not in dump
    assert imported.secret is None


async def test_authenticate_reports_ok_disabled_expired_and_unknown(
    store: KeyStore, redis: Redis, make_key: MakeKey, key_prefix: str
) -> None:
    issued = await make_key()
    assert issued.secret
    ok = await store.authenticate(issued.secret)
    assert ok.status == "ok" and ok.record is not None and ok.record.id == issued.record.id
    assert (await store.authenticate(secrets.generate("kg_"))).status == "not_found"

    await store.update(issued.record.id, {"disabled": True})
    assert (await store.authenticate(issued.secret)).status == "disabled"
    await store.update(issued.record.id, {"disabled": False})

    now = await store.server_time_ms()
    await redis.hset(f"{key_prefix}k:{{{issued.record.id}}}", "expires_at", now - 1)
    expired = await store.authenticate(issued.secret)
    assert expired.status == "expired" and expired.record is not None


async def test_import_by_secret_or_hash_authenticates_the_original_secret(
    store: KeyStore,
) -> None:
    base = {"workspace_id": "ws-a", "user_id": str(uuid.uuid4())}
    by_secret = await store.create(dict(base), secret="sk-live-0123456789")
    by_hash = await store.create(dict(base), sha256=secrets.hash_secret("old-key-abcdef"))
    assert by_secret.record.imported and by_hash.record.imported
    assert by_hash.record.prefix == ""
    # Nothing of the hash either: 32 bits of it would narrow a short secret's search.
    assert by_hash.record.label == f"imported:{by_hash.record.id[:8]}"
    assert (await store.authenticate("sk-live-0123456789")).status == "ok"
    result = await store.authenticate("old-key-abcdef")
    assert result.record is not None and result.record.id == by_hash.record.id


async def test_importing_a_known_secret_conflicts_and_writes_nothing(
    store: KeyStore, redis: Redis, key_prefix: str
) -> None:
    base = {"workspace_id": "ws-a", "user_id": str(uuid.uuid4())}
    await store.create(dict(base), secret="sk-live-0123456789")
    before = await store.count(None)
    with pytest.raises(KeyExists):
        await store.create(dict(base), sha256=secrets.hash_secret("sk-live-0123456789"))
    assert await store.count(None) == before
    assert len([k async for k in redis.scan_iter(match=f"{key_prefix}k:*")]) == 1


async def test_update_changes_only_given_fields_and_null_clears(
    store: KeyStore, make_key: MakeKey
) -> None:
    issued = await make_key(name="before", team_name="t1", scopes=["a:b"])
    updated = await store.update(issued.record.id, {"name": "after", "team_name": None})
    assert updated is not None
    assert (updated.name, updated.team_name, updated.scopes) == ("after", None, ("a:b",))
    assert updated.hash == issued.record.hash
    assert updated.updated_at >= issued.record.updated_at
    assert await store.update(str(uuid.uuid4()), {"name": "x"}) is None


async def test_update_refuses_a_key_of_another_workspace(
    store: KeyStore, make_key: MakeKey
) -> None:
    issued = await make_key(name="mine", workspace_id="ws-b")
    assert await store.update(issued.record.id, {"name": "hijack"}, "ws-a") is None
    record = await store.get(issued.record.id)
    assert record is not None and record.name == "mine"


async def test_revoke_removes_every_way_to_reach_the_key(
    store: KeyStore, redis: Redis, make_key: MakeKey, key_prefix: str
) -> None:
    issued = await make_key()
    assert issued.secret
    rotated = await store.rotate(issued.record.id, grace_seconds=60)
    assert rotated is not None and rotated.secret
    assert await store.revoke(issued.record.id)
    assert (await store.authenticate(issued.secret)).status == "not_found"
    assert (await store.authenticate(rotated.secret)).status == "not_found"
    assert await _everything_stored(redis, key_prefix) == ""
    assert not await store.revoke(issued.record.id)


async def test_rotation_keeps_id_and_the_old_secret_only_for_the_grace_period(
    store: KeyStore, make_key: MakeKey
) -> None:
    issued = await make_key(name="rot")
    assert issued.secret
    rotated = await store.rotate(issued.record.id, grace_seconds=0.5)
    assert rotated is not None and rotated.secret and rotated.secret != issued.secret
    assert rotated.record.id == issued.record.id and rotated.record.name == "rot"
    assert (await store.authenticate(rotated.secret)).status == "ok"
    assert (await store.authenticate(issued.secret)).status == "ok"  # within grace
    await asyncio.sleep(0.7)
    assert (await store.authenticate(issued.secret)).status == "not_found"
    assert (await store.authenticate(rotated.secret)).status == "ok"


async def test_rotation_without_grace_refuses_the_old_secret_at_once(
    store: KeyStore, make_key: MakeKey
) -> None:
    issued = await make_key()
    assert issued.secret
    rotated = await store.rotate(issued.record.id, grace_seconds=0)
    assert rotated is not None and rotated.secret
    assert (await store.authenticate(issued.secret)).status == "not_found"


async def test_a_second_rotation_ends_the_first_grace_period(
    store: KeyStore, make_key: MakeKey
) -> None:
    issued = await make_key()
    first = await store.rotate(issued.record.id, grace_seconds=60)
    second = await store.rotate(issued.record.id, grace_seconds=60)
    assert first and second and first.secret and second.secret and issued.secret
    assert (await store.authenticate(issued.secret)).status == "not_found"
    assert (await store.authenticate(first.secret)).status == "ok"
    assert (await store.authenticate(second.secret)).status == "ok"


async def test_paging_lists_every_key_once_while_keys_come_and_go(
    store: KeyStore, make_key: MakeKey
) -> None:
    made = [await make_key(name=f"k{i}") for i in range(7)]
    seen: list[str] = []
    page = await store.list(workspace_id="ws-a", limit=3)
    seen += [r.id for r in page.records]
    await store.revoke(made[0].record.id)  # already listed
    late = await make_key(name="late")  # created after the first page: listed at the end
    while page.next_cursor:
        page = await store.list(workspace_id="ws-a", limit=3, cursor=page.next_cursor)
        seen += [r.id for r in page.records]
    assert len(seen) == len(set(seen))  # nothing twice
    assert set(seen) == {m.record.id for m in made} | {late.record.id}  # nothing skipped
    order = sorted([*made, late], key=lambda issued: issued.record.index_member())
    assert seen == [issued.record.id for issued in order]  # creation time, then id


async def test_listing_filters_and_scopes(store: KeyStore, make_key: MakeKey) -> None:
    owner = str(uuid.uuid4())
    mine = await make_key(user_id=owner)
    off = await make_key(user_id=owner, disabled=True)
    other_ws = await make_key(workspace_id="ws-b")
    ws_a = await store.list(workspace_id="ws-a")
    assert [r.id for r in ws_a.records] == [mine.record.id]
    with_disabled = await store.list(workspace_id="ws-a", include_disabled=True)
    assert {r.id for r in with_disabled.records} == {mine.record.id, off.record.id}
    by_user = await store.list(workspace_id=None, user_id=owner, include_disabled=True)
    assert {r.id for r in by_user.records} == {mine.record.id, off.record.id}
    org = await store.list(workspace_id=None)
    assert {r.id for r in org.records} == {mine.record.id, other_ws.record.id}
    assert (await store.list(workspace_id="nobody")).records == []


async def test_exactly_one_page_has_no_next_cursor(store: KeyStore, make_key: MakeKey) -> None:
    for _ in range(3):
        await make_key()
    page = await store.list(workspace_id="ws-a", limit=3)
    assert len(page.records) == 3 and page.next_cursor is None


async def test_a_forged_cursor_is_refused(store: KeyStore) -> None:
    with pytest.raises(BadCursor):
        await store.list(workspace_id="ws-a", cursor="bm90LWEtY3Vyc29y")


async def test_concurrent_rotations_leave_exactly_one_current_secret(
    store: KeyStore, make_key: MakeKey
) -> None:
    issued = await make_key()
    results = await asyncio.gather(*(store.rotate(issued.record.id, 0) for _ in range(5)))
    secrets_out = [r.secret for r in results if r is not None and r.secret]
    assert len(secrets_out) == 5
    statuses = [(await store.authenticate(s)).status for s in secrets_out]
    assert statuses.count("ok") == 1


@pytest.mark.parametrize("length", [16, 17, 20, 24, 32, 36, 42, 48, 64, 100, 512])
async def test_masks_of_an_imported_secret_show_at_most_a_third_of_it(
    store: KeyStore, length: int
) -> None:
    """The prefix and the label overlap (both start the secret): counted together, they
    show at most a third of it, whatever its length."""
    secret = "".join(secrets.BASE62[(i * 7) % 62] for i in range(length))
    issued = await store.create(
        {"workspace_id": "ws-a", "user_id": str(uuid.uuid4())}, secret=secret
    )
    prefix, label = issued.record.prefix, issued.record.label
    head, _, tail = label.partition("...")
    assert secret.startswith(prefix) and secret.startswith(head) and secret.endswith(tail)
    shown = max(len(prefix), len(head)) + len(tail)
    assert 3 * shown <= length, (prefix, label)
    assert len(prefix) >= 4  # still enough to tell keys apart in a listing
    stored = await store.get(issued.record.id)
    assert stored is not None and (stored.prefix, stored.label) == (prefix, label)
