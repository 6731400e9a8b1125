"""Reading keys for the dialects: whole listings and offset windows over the store's
creation-ordered index (KeyStore.list pages by cursor, so each read here is consistent
however keys are created or revoked meanwhile)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.store.record import KeyRecord

if TYPE_CHECKING:
    from gateway.store.keystore import KeyStore

_BATCH = 1000  # keys read per store call


async def all_keys(
    store: KeyStore,
    workspace_id: str | None,
    *,
    user_id: str | None = None,
    include_disabled: bool = True,
) -> list[KeyRecord]:
    """Every key of a workspace (``None``: of every workspace; of one user, when given),
    oldest first."""
    return await _read(store, workspace_id, user_id, include_disabled, None)


async def window(
    store: KeyStore,
    workspace_id: str | None,
    *,
    offset: int,
    limit: int,
    user_id: str | None = None,
    include_disabled: bool = True,
) -> list[KeyRecord]:
    """Keys ``offset`` to ``offset + limit`` (oldest first); reads no further than that.

    New keys sort after every existing one, so creating keys never moves an earlier page.
    """
    records = await _read(store, workspace_id, user_id, include_disabled, offset + limit)
    return records[offset : offset + limit]


async def _read(
    store: KeyStore,
    workspace_id: str | None,
    user_id: str | None,
    include_disabled: bool,
    enough: int | None,
) -> list[KeyRecord]:
    """Keys oldest first, a store batch at a time, until ``enough`` (None: all) are read."""
    records: list[KeyRecord] = []
    cursor: str | None = None
    while enough is None or len(records) < enough:
        page = await store.list(
            workspace_id=workspace_id,
            user_id=user_id,
            include_disabled=include_disabled,
            limit=_BATCH,
            cursor=cursor,
        )
        records.extend(page.records)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return records
