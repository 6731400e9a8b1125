"""KeyStore: every read and write of key records, one atomic script per change."""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway.store import secrets
from gateway.store.clock import ClockOverride, server_clock
from gateway.store.connection import StoreClient
from gateway.store.names import KeyNames
from gateway.store.record import KeyRecord, decode, encode_fields, index_member, pairs_to_dict
from gateway.store.report import UsageReport
from gateway.store.scripts import Scripts
from gateway.store.slots import id_in_slot, key_slot, secret_in_slot
from gateway.store.workspaces import Workspaces

AuthStatus = Literal["ok", "not_found", "disabled", "expired"]
_MEMBER = re.compile(r"^\d{15}:[0-9a-f-]{36}$")
# The stored fields whose change re-bases the spending caps (update.lua).
CAP_FIELDS = frozenset({"limit_micro", "limit_reset", "include_byok_in_limit", "spend_caps"})
_CONCURRENT_CALLS = 32  # per batch of script calls on a Cluster (listing reports)
_RETRIES = 5  # optimistic retries when a concurrent rotation changes the hash under us


class KeyExists(Exception):
    """The secret (or sha256) being imported or generated is already a key."""


class BadCursor(ValueError):
    """A listing cursor that keygate did not issue."""


@dataclass(frozen=True, slots=True)
class AuthResult:
    status: AuthStatus
    record: KeyRecord | None
    now_ms: int


@dataclass(frozen=True, slots=True)
class Issued:
    """A record together with its secret, which exists only in this reply."""

    record: KeyRecord
    secret: str | None


@dataclass(frozen=True, slots=True)
class Page:
    records: list[KeyRecord]
    next_cursor: str | None


def encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        member = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("cursor is not one keygate issued") from None
    if not _MEMBER.match(member):
        raise BadCursor("cursor is not one keygate issued")
    return member


class KeyStore:
    def __init__(
        self,
        client: StoreClient,
        names: KeyNames,
        secret_prefix: str,
        clock: ClockOverride = server_clock,
    ) -> None:
        self.client = client
        self.names = names
        self.secret_prefix = secret_prefix
        self.scripts = Scripts.register(client)
        self.clock = clock  # '' (the server's TIME) except in tests of period rollover
        # Workspace budgets; their clock is this store's, also when a test replaces it.
        self.workspaces = Workspaces(client, names, lambda: self.clock())

    async def server_time_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def reservations(self, key_id: str) -> tuple[int, int]:
        """The key's requests in flight: how many ledger entries are pending with their
        lease not ended, and what they reserve (micro-units). One HVALS: the single-key
        view's, never a listing's."""
        clock = self.clock()
        now = int(clock) if clock else await self.server_time_ms()
        count = reserved = 0
        for raw in await self.client.hvals(self.names.ledger_entries(key_id)):
            entry = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not entry.startswith("p:"):
                continue  # resolved at its lease end, kept for a late settlement
            # p:amount:at:byok:rule:lease_end[:token estimate] (authorize.lua)
            _, amount, _, _, _, lease_end = entry.split(":")[:6]
            if int(lease_end) > now:
                count += 1
                reserved += int(amount)
        return count, reserved

    async def create(
        self, values: dict[str, Any], *, secret: str | None = None, sha256: str | None = None
    ) -> Issued:
        """Store a new key from validated ``values``; generate a secret unless one is given.

        ``secret`` or ``sha256`` adopts an existing key (import); raises KeyExists when that
        hash is already known. Returns the secret only when keygate generated it.
        """
        generated = secret is None and sha256 is None
        if generated:
            secret = secrets.generate(self.secret_prefix)
        digest = sha256 if sha256 is not None else secrets.hash_secret(secret or "")
        # In the lookup's Cluster slot: one script creates both (slots.py).
        key_id = id_in_slot(key_slot(self.names.by_hash(digest)))
        if secret is None:
            prefix, label = "", secrets.label_for_hash_import(key_id)
        elif generated:
            prefix, label = secrets.display_prefix(secret), secrets.label(secret)
        else:
            prefix, label = secrets.imported_masks(secret)
        fields: dict[str, Any] = {
            "type": "PERSONAL",
            "scopes": (),
            "disabled": False,
            "include_byok_in_limit": False,
            **values,
            "workspace_capped": None,  # the store's own flag (below), never an input's
            "id": key_id,
            "hash": digest,
            "prefix": prefix,
            "label": label,
            "imported": not generated,
        }
        # Flagged at once when the workspace has a budget already, so a Redis error after
        # the record is written cannot leave it unflagged; the check after the writes
        # (below) covers a budget set meanwhile.
        capped = await self.workspaces.capped(str(fields.get("workspace_id", "")))
        fields["workspace_capped"] = True if capped else None
        encoded = encode_fields(fields)
        # Encoded here, before the index write below, so a value Redis cannot take (a lone
        # surrogate: no UTF-8) fails with nothing written rather than leave index members.
        flat = [item.encode() for pair in encoded.items() for item in pair]
        # The listing indexes live on other slots than the key, so they are written first:
        # a member whose record never comes is skipped by listings. Their order is the
        # creation instant, which the record then carries too.
        now = await self.server_time_ms()
        member = index_member(now, key_id)
        indexes = (self.names.workspace_index(encoded["workspace_id"]), self.names.org_index())
        await self._index(indexes, member, add=True)
        created = await self.scripts.create(
            keys=[self.names.by_hash(digest), self.names.record(key_id)],
            args=[key_id, now, *flat],
        )
        if created != 1:
            await self._index(indexes, member, add=False)
            if created == -1:
                raise KeyExists("a key with this secret already exists")
            raise KeyExists("key id collision")  # never overwrite, however unlikely
        # After the index member and the record: PUT /v1/workspaces/{id} writes the caps,
        # then walks this index; here the caps are read after both writes, so one of the
        # two always sees the other and the key is flagged (store/workspaces.py).
        if not capped:
            await self.workspaces.flag_if_capped(encoded["workspace_id"], key_id)
        record = decode({**encoded, "created_at": str(now), "updated_at": str(now)})
        return Issued(record, secret if generated else None)

    async def _index(self, indexes: Sequence[str], member: str, *, add: bool) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for index in indexes:
                if add:
                    pipe.zadd(index, {member: 0})
                else:
                    pipe.zrem(index, member)
            await pipe.execute()

    async def get(self, key_id: str, workspace_id: str | None = None) -> KeyRecord | None:
        """The record, or None when there is none (or it belongs to another workspace)."""
        raw = cast(dict[str, str], await self.client.hgetall(self.names.record(key_id)))
        if not raw:
            return None
        record = decode(raw)
        if workspace_id is not None and record.workspace_id != workspace_id:
            return None
        return record

    async def authenticate(self, secret: str) -> AuthResult:
        """Resolve a presented secret: ok, not_found, disabled or expired, with the record.

        A secret shaped like a keygate secret with a wrong checksum is not_found without
        asking Redis, as on the proxy's routes: one rule on every listener."""
        if secrets.has_bad_checksum(secret, self.secret_prefix):
            return AuthResult("not_found", None, 0)
        digest = secrets.hash_secret(secret)
        key_id = cast(str | None, await self.client.get(self.names.by_hash(digest)))
        if key_id is None:
            return AuthResult("not_found", None, 0)
        reply = await self.scripts.authenticate(keys=[self.names.record(key_id)], args=[digest])
        status = cast(AuthStatus, str(reply[0]))
        now = int(reply[1])
        if status == "not_found":
            return AuthResult("not_found", None, now)
        return AuthResult(status, decode(pairs_to_dict(reply[2:])), now)

    async def list(
        self,
        *,
        workspace_id: str | None,
        user_id: str | None = None,
        include_disabled: bool = False,
        limit: int = 100,
        cursor: str | None = None,
        where: Callable[[KeyRecord], bool] | None = None,
    ) -> Page:
        """One page in creation order; ``workspace_id=None`` lists every workspace.

        ``where`` keeps only the records it accepts (after the other filters), so a page is
        full whenever more keys match. The cursor is the last listed index member, so keys
        created or revoked between pages never make another key repeat or vanish.
        """
        index = (
            self.names.workspace_index(workspace_id)
            if workspace_id is not None
            else self.names.org_index()
        )
        start = f"({decode_cursor(cursor)}" if cursor else "-"
        found: list[tuple[str, KeyRecord]] = []
        batch_size = min(max(limit + 1, 32), 1000)
        while len(found) <= limit:
            members = cast(
                list[str], await self.client.zrangebylex(index, start, "+", start=0, num=batch_size)
            )
            if not members:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hgetall(self.names.record(member.split(":", 1)[1]))
                raws = cast(list[dict[str, str]], await pipe.execute())
            for member, raw in zip(members, raws, strict=True):
                if not raw:
                    continue  # revoked after the index was read
                record = decode(raw)
                if user_id is not None and record.user_id != user_id:
                    continue
                if record.disabled and not include_disabled:
                    continue
                if where is not None and not where(record):
                    continue
                found.append((member, record))
                if len(found) > limit:
                    break
            start = f"({members[-1]}"
        next_cursor = encode_cursor(found[limit - 1][0]) if len(found) > limit and limit else None
        return Page([record for _, record in found[:limit]], next_cursor)

    async def update(
        self, key_id: str, values: dict[str, Any], workspace_id: str | None = None
    ) -> KeyRecord | None:
        """Set only the given fields (None clears one); None when there is no such key.

        Changing a spending cap re-bases the caps in the same script (see update.lua)."""
        to_set = encode_fields(values)
        # None clears a field; so does an empty token_limits (the script tests presence).
        to_clear = [
            name
            for name, value in values.items()
            if value is None or (name == "token_limits" and not value)
        ]
        reply = await self.scripts.update(
            keys=[self.names.record(key_id), self.names.usage(key_id, "")],
            args=[
                workspace_id or "",
                self.clock(),
                "1" if CAP_FIELDS.intersection(values) else "0",
                len(to_set),
                *[x for p in to_set.items() for x in p],
                *to_clear,
            ],
        )
        return decode(pairs_to_dict(reply)) if reply else None

    async def report(
        self, key_id: str, workspace_id: str | None = None, presented: str | None = None
    ) -> tuple[str, UsageReport | None]:
        """The key with its usage now: (status, report). With ``presented`` (a sha256) the
        hash must be the key's, as for GET /v1/key. Status not_found has no report."""
        reply = await self.scripts.report(
            keys=self._report_keys(key_id), args=[presented or "", self.clock()]
        )
        return self._parse_report(reply, workspace_id)

    async def reports(self, key_ids: Sequence[str]) -> dict[str, UsageReport]:
        """Reports for many keys in one pipelined round trip (revoked ones are left out)."""
        if not key_ids:
            return {}
        replies = await self._report_replies(key_ids)
        found = {}
        for key_id, reply in zip(key_ids, replies, strict=True):
            report = self._parse_report(reply, None)[1]
            if report is not None:
                found[key_id] = report
        return found

    async def _report_replies(self, key_ids: Sequence[str]) -> builtins.list[Any]:
        """report.lua for each key: one pipelined round trip on one server; on a Cluster
        (whose redis-py pipelines refuse scripts) concurrent calls, routed by slot."""
        args = ["", self.clock()]
        if isinstance(self.client, RedisCluster):
            replies: builtins.list[Any] = []
            for start in range(0, len(key_ids), _CONCURRENT_CALLS):
                chunk = key_ids[start : start + _CONCURRENT_CALLS]
                replies += await asyncio.gather(
                    *(self.scripts.report(keys=self._report_keys(k), args=args) for k in chunk)
                )
            return replies
        script = self.scripts.report
        for attempt in range(2):
            async with self.client.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    keys = self._report_keys(key_id)
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                break
            await self.scripts.load()  # the server lost its script cache (a restart)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _report_keys(self, key_id: str) -> builtins.list[str]:
        names = self.names
        return [names.record(key_id), names.usage(key_id, ""), names.rate(key_id)]

    @staticmethod
    def _parse_report(
        reply: builtins.list[Any], workspace_id: str | None
    ) -> tuple[str, UsageReport | None]:
        status = str(reply[0])
        if status == "not_found":
            return status, None
        report = UsageReport.from_reply(reply)
        if workspace_id is not None and report.record.workspace_id != workspace_id:
            return "not_found", None
        return status, report

    async def revoke(self, key_id: str, workspace_id: str | None = None) -> bool:
        """Delete the key everywhere at once; False when there is no such key."""
        for _ in range(_RETRIES):
            record = await self.get(key_id, workspace_id)
            if record is None:
                return False
            names = self.names
            result = await self.scripts.revoke(
                keys=[
                    names.record(key_id),
                    names.by_hash(record.hash),
                    names.by_hash(record.grace_hash or record.hash),
                    names.rate(key_id),
                    names.usage(key_id, "t"),
                    names.usage(key_id, "bt"),
                    names.ledger(key_id),
                    names.ledger_entries(key_id),
                    names.pending_ids(key_id),
                ],
                args=[record.hash],
            )
            if result == -1:
                continue
            indexes = (names.workspace_index(record.workspace_id), names.org_index())
            await self._index(indexes, record.index_member(), add=False)
            return bool(result == 1)
        raise RuntimeError("key changed during every revoke attempt")

    async def rotate(
        self, key_id: str, grace_seconds: float, workspace_id: str | None = None
    ) -> Issued | None:
        """New secret, same id and usage; the old one works ``grace_seconds`` more."""
        for _ in range(_RETRIES):
            record = await self.get(key_id, workspace_id)
            if record is None:
                return None
            names = self.names
            # Its lookup in the record's Cluster slot: one script swaps them (slots.py).
            slot = key_slot(names.record(key_id))
            secret = await asyncio.to_thread(
                secret_in_slot, self.secret_prefix, slot, names.by_hash("")
            )
            digest = secrets.hash_secret(secret)
            reply = await self.scripts.rotate(
                keys=[
                    names.record(key_id),
                    names.by_hash(digest),
                    names.by_hash(record.hash),
                    names.by_hash(record.grace_hash or record.hash),
                ],
                args=[
                    record.hash,
                    digest,
                    round(grace_seconds * 1000),
                    secrets.display_prefix(secret),
                    secrets.label(secret),
                    workspace_id or "",
                ],
            )
            if not reply:
                return None
            if reply[0] in (-1, -2):
                continue
            return Issued(decode(pairs_to_dict(reply)), secret)
        raise RuntimeError("key changed during every rotate attempt")

    async def count(self, workspace_id: str | None) -> int:
        index = (
            self.names.workspace_index(workspace_id)
            if workspace_id is not None
            else self.names.org_index()
        )
        return int(await self.client.zcard(index))

    async def counts_by_workspace(self) -> dict[str, int]:
        """Keys per workspace, from the workspace indexes (a SCAN: for background use)."""
        marker = self.names.workspace_index("")
        pattern = _glob_escape(marker) + "*"
        indexes = [str(k) async for k in self.client.scan_iter(match=pattern, count=1000)]
        if not indexes:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zcard(index)
            sizes = await pipe.execute()
        return {
            index[len(marker) :]: int(size)
            for index, size in zip(indexes, sizes, strict=True)
            if int(size) > 0
        }


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
