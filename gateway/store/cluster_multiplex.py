"""The proxy's Redis client for a Redis Cluster: one multiplexed connection per primary.

Every command keygate sends on the request path names keys of one slot (slots.py), so it
is routed by its first key's slot to that slot's primary, where it joins that connection's
per-turn batch (multiplex.py). The slot map comes from CLUSTER SLOTS, asked of the seed
nodes (then of any known node), and is refreshed when a node answers MOVED, when a node
cannot be reached, or when the cluster says it is down.

Redirections are followed without the caller seeing them: MOVED (the command was not run:
send it to the new owner) and ASK (a slot half migrated: ASKING, then the command, on the
target). TRYAGAIN (a multi-key command during a migration: keygate's scripts name keys that need
not exist, so they get it until the slot has moved) is retried after a pause, for up to
socket_timeout. A connection failure is the caller's error, as with one server: the
command may have run.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RedisSettings
from gateway.store.multiplex import (
    Arg,
    LuaScript,
    MultiplexStats,
    RedisMultiplexer,
    reply_text,
)
from gateway.store.slots import SLOTS, key_slot
from gateway.store.topology import RedisTarget, parse_target

Address = tuple[str, int]
_FREE_HOPS: Final = 3  # redirections followed at once; later ones wait _TRY_AGAIN_PAUSE
_TRY_AGAIN_PAUSE = 0.05
_REFRESH_INTERVAL = 0.25  # at most this often on errors: a node down is asked about once


class ClusterMultiplexer:
    """RedisMultiplexer's interface over a Redis Cluster (see module doc)."""

    def __init__(
        self,
        target: RedisTarget,
        *,
        connect_timeout: float,
        socket_timeout: float,
        replica_acks: int = 0,
        replica_ack_timeout: float = 0.5,
        health_check_interval: float = 0.0,
    ) -> None:
        self._target = target
        self._timeouts = (connect_timeout, socket_timeout)
        self._health_check_interval = health_check_interval
        self._replicas = (replica_acks, replica_ack_timeout)
        self._seeds: list[Address] = list(target.hosts)
        self._owners: list[Address | None] = [None] * SLOTS
        self._nodes: dict[Address, RedisMultiplexer] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -_REFRESH_INTERVAL
        self._closed = False
        # Called for each batch too few replicas confirmed in time (the proxy counts them).
        self.on_unreplicated: Callable[[], None] = lambda: None  # replaced by the proxy

    @property
    def stats(self) -> MultiplexStats:
        """Every node's counters, added up."""
        total = MultiplexStats()
        for node in self._nodes.values():
            for name in MultiplexStats.__slots__:
                setattr(total, name, getattr(total, name) + getattr(node.stats, name))
        return total

    # --- the RedisMultiplexer interface ------------------------------------------------------

    async def execute(self, *args: Arg) -> Any:
        def send(node: RedisMultiplexer, asking: bool) -> Awaitable[Any]:
            return node.execute_asking(*args) if asking else node.execute(*args)

        return await self._routed(_slot_of(args), send)

    async def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """As RedisMultiplexer.evalsha: the source goes along only after NOSCRIPT."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    def submit(self, *args: Arg) -> asyncio.Future[Any] | None:
        """The command as a task (it may be redirected), or None before the slot map is
        known (nothing was sent; see ``connect``)."""
        owner = self._owners[_slot_of(args)]
        if owner is None:
            return None
        return asyncio.ensure_future(self.execute(*args))

    async def run_script(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[Arg],
        when_cancelled: Callable[[Any], None],
    ) -> Any:
        def send(node: RedisMultiplexer, asking: bool) -> Awaitable[Any]:
            # asking: the slot is half moved; the target runs it once, after ASKING, and a
            # cancelled caller's reply still reaches when_cancelled.
            return node.run_script(script, keys, args, when_cancelled, asking=asking)

        return await self._routed(key_slot(keys[0]) if keys else 0, send)

    async def late_replies_handled(self) -> None:
        await asyncio.gather(*(node.late_replies_handled() for node in self._nodes.values()))

    async def ping(self) -> None:
        """A PING to every primary the slot map names (learned first if not known), each
        over the proxy's own connection to it; raises the first failure."""
        await self.connect()
        owners = {owner for owner in self._owners if owner is not None}
        await asyncio.gather(*(self._node(owner).ping() for owner in owners))

    async def connect(self) -> None:
        """Learn the slot map if it is not known; raises when no node answers."""
        if self._owners[0] is None:
            await self._refresh()

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.wait([self._refreshing])
        nodes, self._nodes = list(self._nodes.values()), {}
        await asyncio.gather(*(node.close() for node in nodes))

    # --- routing -----------------------------------------------------------------------------

    async def _routed(
        self, slot: int, send: Callable[[RedisMultiplexer, bool], Awaitable[Any]]
    ) -> Any:
        """``send`` to the slot's primary, following redirections until socket_timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeouts[1]
        node, asking = await self._node_for(slot), False
        for hop in itertools.count():
            try:
                return await send(node, asking)
            except RedisError as exc:
                node, asking = await self._redirected(exc, slot)
            if loop.time() > deadline:
                raise ClusterDownError(
                    f"slot {slot} of the Redis Cluster kept moving for {self._timeouts[1]:g}s"
                )
            if hop >= _FREE_HOPS:
                await asyncio.sleep(_TRY_AGAIN_PAUSE)  # the map is in flux: do not spin
        raise AssertionError("unreachable")

    async def _node_for(self, slot: int) -> RedisMultiplexer:
        owner = self._owners[slot]
        if owner is None:
            await self._refresh()
            owner = self._owners[slot]
            if owner is None:
                raise ClusterDownError(f"no node of the Redis Cluster serves slot {slot}")
        return self._node(owner)

    def _node(self, address: Address) -> RedisMultiplexer:
        node = self._nodes.get(address)
        if node is None:
            if self._closed:
                raise RedisConnectionError("the Redis client was closed")
            node = RedisMultiplexer(
                self._target,
                address=address,
                connect_timeout=self._timeouts[0],
                socket_timeout=self._timeouts[1],
                replica_acks=self._replicas[0],
                replica_ack_timeout=self._replicas[1],
                health_check_interval=self._health_check_interval,
            )
            node.on_unreplicated = lambda: self.on_unreplicated()
            self._nodes[address] = node
        return node

    async def _redirected(self, error: RedisError, slot: int) -> tuple[RedisMultiplexer, bool]:
        """Where to send a command again after ``error``, and whether with ASKING; raises
        ``error`` when it is not a redirection (the command's own failure)."""
        if isinstance(error, MovedError):  # the slot has a new owner: the map is old
            self._owners[slot] = (error.host, error.port)
            self._refresh_soon()
            return self._node((error.host, error.port)), False
        if isinstance(error, AskError):
            return self._node((error.host, error.port)), True
        if isinstance(error, TryAgainError):
            await asyncio.sleep(_TRY_AGAIN_PAUSE)
            return await self._node_for(slot), False
        if isinstance(error, (ClusterDownError, RedisConnectionError, RedisTimeoutError)):
            self._refresh_soon()  # a failover: the next calls go to the new primary
        raise error

    # --- the slot map ------------------------------------------------------------------------

    def _refresh_soon(self) -> None:
        loop = asyncio.get_running_loop()
        if self._refreshing is None and loop.time() - self._refreshed_at >= _REFRESH_INTERVAL:
            self._refreshing = loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        """Ask the seeds, then every known node, for CLUSTER SLOTS; the first answer wins."""
        self._refreshed_at = asyncio.get_running_loop().time()
        candidates = list(dict.fromkeys([*self._seeds, *self._nodes]))
        failures: list[str] = []
        try:
            for address in candidates:
                try:
                    reply = await self._node(address).execute("CLUSTER", "SLOTS")
                except (OSError, RedisError) as exc:
                    failures.append(f"{address[0]}:{address[1]} ({type(exc).__name__})")
                    continue
                self._apply(reply, address)
                return
        finally:
            if self._refreshing is asyncio.current_task():
                self._refreshing = None
        raise RedisConnectionError(f"no node of the Redis Cluster answered: {', '.join(failures)}")

    def _apply(self, reply: list[Any], asked: Address) -> None:
        owners: list[Address | None] = [None] * SLOTS
        for start, end, primary, *_ in reply:
            host = reply_text(primary[0]) or asked[0]
            if host == "?":
                continue  # a node whose address its peers do not know yet
            owner = (host, int(primary[1]))
            owners[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
        self._owners = owners  # a node that lost its slots keeps its connection until close


def _slot_of(args: Sequence[Arg]) -> int:
    """The slot of a command's first key: EVAL/EVALSHA name theirs after numkeys."""
    name = args[0]
    if isinstance(name, str) and name.upper() in ("EVALSHA", "EVAL"):
        key = args[3] if int(args[2]) > 0 else None
    else:
        key = args[1] if len(args) > 1 else None
    if key is None:
        return 0
    return key_slot(key.decode() if isinstance(key, bytes) else str(key))


# The proxy's Redis client, whatever the topology.
Multiplexer: TypeAlias = RedisMultiplexer | ClusterMultiplexer


def multiplexer_for(settings: RedisSettings, url: str) -> Multiplexer:
    """The proxy's client for ``url`` with the ``redis.*`` options."""
    target = parse_target(url, settings)
    kind = ClusterMultiplexer if target.kind == "cluster" else RedisMultiplexer
    return kind(
        target,
        connect_timeout=settings.connect_timeout,
        socket_timeout=settings.socket_timeout,
        replica_acks=settings.replica_acks,
        replica_ack_timeout=settings.replica_ack_timeout,
        health_check_interval=settings.health_check_interval,
    )
