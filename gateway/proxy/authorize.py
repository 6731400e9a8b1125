"""Key lookup and authorization for the proxy: one coalesced Redis call per request.

The only thing cached in the process is ``sha256 -> key id``, which never changes for a
key's life; everything that can change (revoked, disabled, expired, rotated) is decided in
Redis on every request, so a change is seen by the very next request on every replica.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gateway.proxy.context import KeyIdentity
from gateway.store.multiplex import LuaScript, RedisMultiplexer
from gateway.store.names import KeyNames
from gateway.store.secrets import has_bad_checksum

AUTHORIZE = LuaScript.from_source(
    resources.files("gateway.store").joinpath("lua", "authorize.lua").read_text("utf-8")
)


@dataclass(frozen=True, slots=True)
class Decision:
    status: str  # ok | not_found | disabled | expired
    key: KeyIdentity | None = None


NOT_FOUND = Decision("not_found")


class HashCache:
    """Bounded LRU of sha256 -> key id, so a flood of random keys cannot grow memory."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str) -> str | None:
        key_id = self._entries.get(digest)
        if key_id is not None:
            self._entries.move_to_end(digest)
        return key_id

    def put(self, digest: str, key_id: str) -> None:
        if self._size <= 0:
            return
        self._entries[digest] = key_id
        self._entries.move_to_end(digest)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


@functools.lru_cache(maxsize=4096)
def _identity(
    key_id: Any, workspace_id: Any, user_id: Any, scopes: Any, resources: Any
) -> KeyIdentity:
    """The identity in an authorize reply. A key's replies repeat request after request, so
    the JSON is parsed and the object built once per distinct reply (it is immutable)."""
    scope_list = tuple(json.loads(scopes or "[]"))
    return KeyIdentity(
        id=_text(key_id),
        workspace_id=_text(workspace_id),
        user_id=_text(user_id),
        scopes=scope_list,
        resources=None if resources is None else tuple(json.loads(resources)),
        scopes_header=" ".join(scope_list),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class KeyAuthorizer:
    def __init__(
        self, redis: RedisMultiplexer, names: KeyNames, cache_size: int, secret_prefix: str
    ) -> None:
        self.redis = redis
        self.names = names
        self.cache = HashCache(cache_size)
        self.secret_prefix = secret_prefix

    async def authorize(self, secret: str) -> Decision:
        """Decide for a presented secret. Raises Redis errors (the caller fails closed or
        open as configured)."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        key_id = self.cache.get(digest)
        if key_id is None and has_bad_checksum(secret, self.secret_prefix):
            # A mistyped or made-up keygate key: refused without asking Redis. A cached
            # hash is a real key's, so the check is skipped on the hot path.
            return NOT_FOUND
        if key_id is not None:
            decision = await self._decide(key_id, digest)
            if decision is not NOT_FOUND:
                return decision
            # Revoked, or its secret re-imported under a new id: look the hash up afresh.
            self.cache.forget(digest)
        found = await self.redis.execute("GET", self.names.by_hash(digest))
        if found is None:
            return NOT_FOUND
        key_id = _text(found)
        decision = await self._decide(key_id, digest)
        if decision is not NOT_FOUND:
            self.cache.put(digest, key_id)
        return decision

    async def _decide(self, key_id: str, digest: str) -> Decision:
        reply = await self.redis.evalsha(AUTHORIZE, (self.names.record(key_id),), (digest,))
        status = _text(reply[0])
        if status == "not_found":
            return NOT_FOUND
        return Decision(status, _identity(*reply[2:7]))
