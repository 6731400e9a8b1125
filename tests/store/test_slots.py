"""Everything about one key lands in one Redis Cluster slot, whatever way it was made."""

from __future__ import annotations

import hashlib

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot as redis_py_key_slot

from gateway.store import secrets
from gateway.store.keystore import KeyStore
from gateway.store.slots import id_in_slot, key_slot, secret_in_slot
from tests.conftest import MakeKey

VALUES = {"workspace_id": "ws-a", "user_id": "u-1", "scopes": ()}


@pytest.mark.parametrize("slot", [0, 1, 4095, 8191, 12182, 16383])
def test_chosen_ids_and_secrets_fall_in_the_slot_redis_computes(slot: int) -> None:
    key_id = id_in_slot(slot)
    assert redis_py_key_slot(f"kg:k:{{{key_id}}}".encode()) == slot
    assert len(key_id) == 36 and key_id[14] == "4"  # still a UUID4's shape
    secret = secret_in_slot("kg_", slot, "kg:h:")
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert redis_py_key_slot(f"kg:h:{digest}".encode()) == slot
    assert not secrets.has_bad_checksum(secret, "kg_") and len(secret) == 3 + 36


def test_key_slot_follows_the_hash_tag_rules() -> None:
    for key in ("plain", "a{tag}b", "{}empty", "a{}{x}", "{only", "x{y}z{w}"):
        assert key_slot(key) == redis_py_key_slot(key.encode()), key


async def _slots_of(redis: Redis, store: KeyStore, key_id: str) -> set[int]:
    """The slots of every Redis key the store keeps for ``key_id`` (indexes aside)."""
    record = await store.get(key_id)
    assert record is not None
    names = store.names
    keys = [names.record(key_id), names.by_hash(record.hash), names.usage(key_id, "t")]
    keys += [names.rate(key_id)]
    if record.grace_hash:
        keys.append(names.by_hash(record.grace_hash))
        assert await redis.get(names.by_hash(record.grace_hash)) == key_id
    assert await redis.get(names.by_hash(record.hash)) == key_id
    return {key_slot(k) for k in keys}


async def test_created_imported_and_rotated_keys_keep_one_slot(
    store: KeyStore, redis: Redis, make_key: MakeKey
) -> None:
    made = await make_key()
    by_secret = await store.create(VALUES, secret="legacy-customer-secret-1")
    by_hash = await store.create(VALUES, sha256="ab" * 32)
    for issued in (made, by_secret, by_hash):
        assert len(await _slots_of(redis, store, issued.record.id)) == 1
    rotated = await store.rotate(by_secret.record.id, grace_seconds=60)
    assert rotated is not None and rotated.secret is not None
    assert len(await _slots_of(redis, store, by_secret.record.id)) == 1  # new + grace hash
    assert (await store.authenticate(rotated.secret)).status == "ok"
    assert (await store.authenticate("legacy-customer-secret-1")).status == "ok"  # in grace


async def test_a_listing_skips_an_index_member_whose_record_never_came(
    store: KeyStore, redis: Redis, make_key: MakeKey
) -> None:
    """The state a create cut off between its index write and its script leaves."""
    first = await make_key()
    orphan = f"{first.record.created_at:015d}:{id_in_slot(7)}"
    await redis.zadd(store.names.workspace_index("ws-a"), {orphan: 0})
    await redis.zadd(store.names.org_index(), {orphan: 0})
    second = await make_key()
    # Listed by (created_at, id): two keys made in the same millisecond go by id.
    both = sorted((first.record, second.record), key=lambda r: (r.created_at, r.id))
    for workspace in ("ws-a", None):
        page = await store.list(workspace_id=workspace, limit=10)
        assert [r.id for r in page.records] == [r.id for r in both]


async def test_a_refused_import_leaves_no_index_member(store: KeyStore, redis: Redis) -> None:
    await store.create(VALUES, secret="taken-secret")
    before = await redis.zrange(store.names.org_index(), 0, -1)
    with pytest.raises(Exception, match="already exists"):
        await store.create({**VALUES, "workspace_id": "ws-b"}, secret="taken-secret")
    assert await redis.zrange(store.names.org_index(), 0, -1) == before
    assert await redis.zcard(store.names.workspace_index("ws-b")) == 0


async def test_revoke_removes_the_key_and_its_index_members(
    store: KeyStore, redis: Redis, make_key: MakeKey
) -> None:
    issued = await make_key()
    assert await store.revoke(issued.record.id)
    member = issued.record.index_member()
    assert await redis.zscore(store.names.org_index(), member) is None
    assert await redis.zscore(store.names.workspace_index("ws-a"), member) is None
    assert await redis.exists(store.names.record(issued.record.id)) == 0
    assert await redis.exists(store.names.by_hash(issued.record.hash)) == 0
