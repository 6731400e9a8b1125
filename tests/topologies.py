"""Real Redis-compatible topologies for tests: a Redis Cluster, a Sentinel group, a TLS front.

Every server is the packaged Valkey binary (the one keygate embeds), started as a child
process that the kernel stops if this process dies (``die_with_parent``), listening only on
127.0.0.1 on free ports, with its data dir, config and log under a directory the caller gives
(a pytest tmp dir). Each topology is a context manager; ``close()`` stops everything it
started (SIGTERM, up to 5 s, then SIGKILL), and a start that fails halfway stops what it had
started before raising.

Waits are polls against a deadline; one that runs out raises ``TopologyError`` naming what
did not happen, the last answer seen, and the tail of the relevant server logs.

The packaged Valkey has no TLS, so ``start_tls_front`` runs a TLS-terminating TCP proxy (in
a separate process: ``python tests/topologies.py tls-front ...``) in front of a plain server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from gateway.embedded import die_with_parent, server_binary

HOST = "127.0.0.1"
SLOTS = 16384
CLUSTER_BUS_OFFSET = 10000
STOP_TIMEOUT = 5.0
MIGRATE_BATCH = 100

Address = tuple[str, int]
T = TypeVar("T")


class TopologyError(RuntimeError):
    """A topology did not start or did not reach the state a test waits for."""


class NotYet(Exception):
    """Raised by a poll's check: not there yet; the message says what was seen."""


# --- processes ---------------------------------------------------------------------------


_handed_out: set[int] = set()  # ports given to servers by this process (never twice)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A free port on 127.0.0.1; with ``cluster_bus``, one whose port+10000 is free too."""
    for _ in range(500):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port in _handed_out:
            continue
        if cluster_bus:
            bus = port + CLUSTER_BUS_OFFSET
            if port >= 65535 - CLUSTER_BUS_OFFSET or bus in _handed_out or not _bindable(bus):
                continue
            _handed_out.add(bus)
        _handed_out.add(port)
        return port
    raise TopologyError("found no free port on 127.0.0.1")


def tail(log: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = log.read_text(errors="replace").rstrip()
    except OSError:
        return f"(no log at {log})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(eq=False)
class NodeProcess:
    """One server (or proxy) process: its address, argv, log, and the running process."""

    name: str
    host: str
    port: int
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    expected_running: bool = False
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise TopologyError(f"{self.name} was never started")
        return self.process.pid

    def start(self) -> None:
        """Start the process (again, after a kill or stop) with the same argv and log."""
        if self.process is not None and self.process.poll() is None:
            raise TopologyError(f"{self.name} is already running (pid {self.process.pid})")
        self._close_log()
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"=== starting: {' '.join(self.argv)}\n".encode())
        self._log_file.flush()
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        self.expected_running = True

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def kill(self) -> None:
        """SIGKILL (no shutdown of any kind) and reap."""
        self.expected_running = False
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        self.terminate()
        self.reap(time.monotonic() + timeout)

    def terminate(self) -> None:
        self.expected_running = False
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def reap(self, deadline: float) -> None:
        """Wait for a terminated process until ``deadline`` (monotonic), then kill it."""
        if self.process is not None:
            try:
                self.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_log()

    def tail(self, lines: int = 15) -> str:
        return tail(self.log_path, lines)

    def client(self, **options: Any) -> redis.Redis:
        return connect(self.address, **options)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def stop_all(nodes: Iterable[NodeProcess], timeout: float = STOP_TIMEOUT) -> None:
    """Terminate all at once, then reap each (killing what is still up after ``timeout``)."""
    nodes = list(nodes)
    for node in nodes:
        node.terminate()
    deadline = time.monotonic() + timeout
    for node in nodes:
        node.reap(deadline)


def connect(address: Address, **options: Any) -> redis.Redis:
    """A synchronous client that fails fast (no retries) and decodes answers."""
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_connect_timeout", 2.0)
    options.setdefault("decode_responses", True)
    options.setdefault("retry", Retry(NoBackoff(), 0))
    return redis.Redis(host=address[0], port=address[1], **options)


def _run(address: Address, *args: Any) -> Any:
    """One raw command on a fresh connection (no response callbacks: plain RESP replies)."""
    with connect(address) as client:
        return client.execute_command(*args)


def _logs(nodes: Iterable[NodeProcess], lines: int = 12) -> str:
    return "".join(f"\n--- {node.name} ({node.log_path}):\n{node.tail(lines)}" for node in nodes)


def poll(
    what: str,
    check: Callable[[], T | None],
    *,
    timeout: float,
    watch: Sequence[NodeProcess] = (),
    interval: float = 0.05,
) -> T:
    """Call ``check`` until it returns something other than None; its result.

    ``check`` may raise NotYet (or a Redis/OS error) to say what it saw; the last such
    message is part of the error when ``timeout`` runs out. A watched process that should be
    running but has exited fails the wait at once.
    """
    deadline = time.monotonic() + timeout
    last = "nothing yet"
    while True:
        for node in watch:
            if node.expected_running and node.exited():
                code = node.process.returncode if node.process is not None else None
                raise TopologyError(
                    f"{node.name} exited (code {code}) while waiting for {what}" + _logs([node], 30)
                )
        try:
            result = check()
        except NotYet as exc:
            last = str(exc)
        except (redis.RedisError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if result is not None:
                return result
        if time.monotonic() >= deadline:
            raise TopologyError(
                f"{what} did not happen within {timeout:g}s (last seen: {last})" + _logs(watch)
            )
        time.sleep(interval)


def _answers_ping(node: NodeProcess) -> bool | None:
    with node.client(socket_timeout=1.0, socket_connect_timeout=1.0) as client:
        return True if client.ping() else None


def _start_node(
    make: Callable[[int], NodeProcess], *, cluster_bus: bool = False, timeout: float = 15.0
) -> NodeProcess:
    """Start a server on a fresh free port and wait for PING; a lost port race is retried."""
    for attempt in range(3):
        node = make(free_port(cluster_bus=cluster_bus))
        node.start()
        try:
            poll(
                f"{node.name} answering PING",
                functools.partial(_answers_ping, node),
                timeout=timeout,
                watch=[node],
            )
        except TopologyError:
            node.stop()
            if attempt < 2 and "Address already in use" in node.tail(30):
                continue
            raise
        except BaseException:
            node.stop()
            raise
        return node
    raise AssertionError("unreachable")


def server_argv(port: int, data_dir: Path, *extra: str) -> list[str]:
    """The packaged server on 127.0.0.1:``port`` with its files in ``data_dir``."""
    return [
        str(server_binary()),
        "--port",
        str(port),
        "--bind",
        HOST,
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
        # A replica's first sync starts at once, not after the default 5 s of waiting for
        # more replicas to share a diskless transfer.
        "--repl-diskless-sync-delay",
        "0",
        *extra,
    ]


def _pairs(reply: Any) -> dict[str, Any]:
    """A RESP2 flat [k, v, k, v] list (or a RESP3 map) as a dict."""
    if isinstance(reply, dict):
        return {str(k): v for k, v in reply.items()}
    items = list(reply)
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _info_fields(reply: Any) -> dict[str, str]:
    """An INFO-style reply (``key:value`` lines, or redis-py's parsed dict) as a dict."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    fields: dict[str, str] = {}
    for line in str(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


# --- Redis Cluster -----------------------------------------------------------------------


SlotRange = tuple[int, int, Address, tuple[Address, ...]]  # start, end, primary, replicas


def _slot_map(address: Address) -> list[SlotRange]:
    """CLUSTER SLOTS of one node, sorted: (start, end, primary, replicas)."""
    ranges: list[SlotRange] = []
    for entry in _run(address, "CLUSTER", "SLOTS"):
        start, end, primary, *replicas = entry
        ranges.append(
            (
                int(start),
                int(end),
                (str(primary[0]), int(primary[1])),
                tuple(sorted((str(r[0]), int(r[1])) for r in replicas)),
            )
        )
    return sorted(ranges)


def _covers_all(ranges: list[SlotRange]) -> bool:
    expected = 0
    for start, end, _, _ in ranges:
        if start != expected:
            return False
        expected = end + 1
    return expected == SLOTS


def _owner_in(ranges: list[SlotRange], slot: int) -> Address | None:
    for start, end, primary, _ in ranges:
        if start <= slot <= end:
            return primary
    return None


@dataclass(eq=False)
class ClusterTopology:
    """A running Redis Cluster: ``nodes`` (primaries first, then replicas), ``url``, helpers."""

    directory: Path
    nodes: list[NodeProcess] = field(default_factory=list)
    primaries: list[NodeProcess] = field(default_factory=list)
    replicas: list[NodeProcess] = field(default_factory=list)
    timeout: float = 30.0
    _ids: dict[Address, str] = field(default_factory=dict)
    _migrations: dict[int, tuple[Address, Address]] = field(default_factory=dict)

    @property
    def seeds(self) -> list[Address]:
        return [node.address for node in self.primaries]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.seeds)

    def node(self, address: Address) -> NodeProcess:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(f"no node of this cluster at {address[0]}:{address[1]}")

    def client(self, address: Address, **options: Any) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        return connect(address, **options)

    def cluster_client(self, **options: Any) -> redis.cluster.RedisCluster:
        """A redis-py cluster client seeded with the primaries; close it after use."""
        options.setdefault("decode_responses", True)
        options.setdefault("socket_timeout", 5.0)
        return redis.cluster.RedisCluster(
            startup_nodes=[
                redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                for h, p in self.seeds
            ],
            **options,
        )

    def node_id(self, address: Address) -> str:
        if address not in self._ids:
            self._ids[address] = str(_run(address, "CLUSTER", "MYID"))
        return self._ids[address]

    def slot_map(self, address: Address | None = None) -> list[SlotRange]:
        """CLUSTER SLOTS as seen by ``address`` (default: the first running primary)."""
        if address is None:
            address = next(n.address for n in self.primaries if n.expected_running)
        return _slot_map(address)

    @staticmethod
    def slot_of(key: str) -> int:
        return int(key_slot(key.encode()))

    def owner_of_slot(self, slot: int) -> Address:
        owner = _owner_in(self.slot_map(), slot)
        if owner is None:
            raise TopologyError(f"slot {slot} has no owner in CLUSTER SLOTS")
        return owner

    def owner_of(self, key: str) -> Address:
        """The primary serving ``key``'s slot."""
        return self.owner_of_slot(self.slot_of(key))

    # Slot migration, the way redis-cli --cluster reshard does it.

    def begin_migration(self, slot: int, to: Address) -> None:
        """Mark ``slot`` IMPORTING on ``to`` and MIGRATING on its owner; no key moves yet.

        From here until ``finish_migration`` the owner answers ASK for keys already moved
        (see ``move_key``) and still serves the others.
        """
        if slot in self._migrations:
            raise TopologyError(f"slot {slot} is already being migrated")
        source = self.owner_of_slot(slot)
        if source == to:
            raise ValueError(f"slot {slot} is already served by {to[0]}:{to[1]}")
        if self.node(to) not in self.primaries:
            raise ValueError(f"{to[0]}:{to[1]} is not a primary of this cluster")
        _run(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        _run(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to))
        self._migrations[slot] = (source, to)

    def move_key(self, key: str) -> None:
        """Move one key of a slot under migration to its new owner (MIGRATE ... KEYS key)."""
        self.move_keys([key])

    def move_keys(self, keys: Sequence[str]) -> None:
        """Move keys (all of slots under migration) to the importing nodes."""
        by_slot: dict[int, list[str]] = {}
        for key in keys:
            by_slot.setdefault(self.slot_of(key), []).append(key)
        for slot, slot_keys in by_slot.items():
            if slot not in self._migrations:
                raise TopologyError(f"slot {slot} (of {slot_keys[0]!r}) is not being migrated")
            source, target = self._migrations[slot]
            self._migrate(source, target, slot_keys)

    def finish_migration(self, slot: int, to: Address) -> None:
        """Move the slot's remaining keys, then give the slot to ``to`` on every primary.

        Returns once every node's CLUSTER SLOTS names ``to`` as the slot's owner.
        """
        if self._migrations.get(slot, (None, to))[1] != to:
            raise TopologyError(f"slot {slot} is being migrated to {self._migrations[slot][1]}")
        if slot not in self._migrations:
            self.begin_migration(slot, to)
        source, target = self._migrations[slot]
        while keys := _run(source, "CLUSTER", "GETKEYSINSLOT", slot, MIGRATE_BATCH):
            self._migrate(source, target, [str(k) for k in keys])
        target_id = self.node_id(target)
        # redis-cli's order: the target first (so it owns the slot before the source lets
        # go), then the source, then every other primary.
        order = [target, source] + [
            n.address for n in self.primaries if n.address not in (target, source)
        ]
        for address in order:
            _run(address, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        del self._migrations[slot]
        self._wait_slot_owner(slot, target)

    def migrate_slot(self, slot: int, to: Address, keys_first: Sequence[str] = ()) -> None:
        """Move ``slot`` with all its keys to the primary ``to`` (``keys_first`` move first)."""
        self.begin_migration(slot, to)
        if keys_first:
            self.move_keys(keys_first)
        self.finish_migration(slot, to)

    def _migrate(self, source: Address, target: Address, keys: Sequence[str]) -> None:
        reply = _run(source, "MIGRATE", target[0], target[1], "", 0, 5000, "REPLACE", "KEYS", *keys)
        if reply not in ("OK", "NOKEY", b"OK", b"NOKEY", True):
            raise TopologyError(f"MIGRATE of {list(keys)} answered {reply!r}")

    def _wait_slot_owner(self, slot: int, owner: Address) -> None:
        running = [n for n in self.nodes if n.expected_running]

        def check() -> bool:
            for node in running:
                seen = _owner_in(_slot_map(node.address), slot)
                if seen != owner:
                    raise NotYet(f"{node.name} says slot {slot} is served by {seen}")
            return True

        poll(
            f"every node agreeing slot {slot} moved to {owner}",
            check,
            timeout=self.timeout,
            watch=running,
        )

    # Building and stopping.

    def _build(self, primaries: int, replicas_per_primary: int) -> None:
        watch = self.nodes
        for epoch, node in enumerate(self.nodes, start=1):
            # What redis-cli --cluster create does: distinct epochs, so no collisions to settle.
            _run(node.address, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
            self.node_id(node.address)
        for index, node in enumerate(self.primaries):
            first = index * SLOTS // primaries
            last = (index + 1) * SLOTS // primaries - 1
            _run(node.address, "CLUSTER", "ADDSLOTSRANGE", first, last)
        first_node = self.nodes[0]
        for node in self.nodes[1:]:
            _run(first_node.address, "CLUSTER", "MEET", node.host, node.port)

        ids = {self._ids[n.address] for n in self.nodes}

        def all_know_all() -> bool:
            for node in self.nodes:
                known: set[str] = set()
                for line in str(_run(node.address, "CLUSTER", "NODES")).splitlines():
                    parts = line.split()
                    if len(parts) > 2 and "handshake" not in parts[2] and "noaddr" not in parts[2]:
                        known.add(parts[0])
                if not ids <= known:
                    raise NotYet(f"{node.name} knows {len(known & ids)} of {len(ids)} nodes")
            return True

        poll(
            "every cluster node meeting every other",
            all_know_all,
            timeout=self.timeout,
            watch=watch,
        )

        for index, node in enumerate(self.replicas):
            primary = self.primaries[index % primaries]
            _run(node.address, "CLUSTER", "REPLICATE", self._ids[primary.address])

        expected_replicas = {
            p.address: tuple(
                sorted(r.address for i, r in enumerate(self.replicas) if i % primaries == k)
            )
            for k, p in enumerate(self.primaries)
        }

        def settled() -> bool:
            reference: list[SlotRange] | None = None
            for node in self.nodes:
                info = _info_fields(_run(node.address, "CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    raise NotYet(f"{node.name}: cluster_state:{info.get('cluster_state')}")
                ranges = _slot_map(node.address)
                if not _covers_all(ranges):
                    raise NotYet(f"{node.name}: CLUSTER SLOTS does not cover all slots")
                for _, _, primary, replicas in ranges:
                    if replicas != expected_replicas.get(primary):
                        raise NotYet(f"{node.name}: {primary} has replicas {replicas}")
                if reference is not None and ranges != reference:
                    raise NotYet(f"{node.name}'s CLUSTER SLOTS differs from {self.nodes[0].name}'s")
                reference = ranges
            for node in self.replicas:
                link = _info_fields(_run(node.address, "INFO", "replication"))
                if link.get("master_link_status") != "up":
                    raise NotYet(
                        f"{node.name}: master_link_status:{link.get('master_link_status')}"
                    )
            return True

        poll(
            "the cluster reaching cluster_state:ok with all slots agreed",
            settled,
            timeout=self.timeout,
            watch=watch,
        )

    def close(self) -> None:
        stop_all(self.nodes)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_cluster(
    directory: Path, primaries: int = 3, replicas_per_primary: int = 0, *, timeout: float = 30.0
) -> ClusterTopology:
    """Start ``primaries`` (each with ``replicas_per_primary`` replicas) and form a cluster.

    Slots are split evenly across the primaries. Returns once every node says
    ``cluster_state:ok`` and every node's CLUSTER SLOTS covers all 16384 slots alike.
    """
    if primaries < 1:
        raise ValueError("a cluster needs at least one primary")
    directory.mkdir(parents=True, exist_ok=True)
    topology = ClusterTopology(directory.resolve(), timeout=timeout)
    try:
        for index in range(primaries * (1 + replicas_per_primary)):
            role = "primary" if index < primaries else "replica"

            def make(port: int, role: str = role) -> NodeProcess:
                return NodeProcess(
                    name=f"cluster {role} :{port}",
                    host=HOST,
                    port=port,
                    argv=server_argv(
                        port,
                        topology.directory,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(topology.directory / f"nodes-{port}.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ),
                    log_path=topology.directory / f"node-{port}.log",
                )

            node = _start_node(make, cluster_bus=True)
            topology.nodes.append(node)
            (topology.primaries if index < primaries else topology.replicas).append(node)
        topology._build(primaries, replicas_per_primary)
    except BaseException:
        topology.close()
        raise
    return topology


# --- Sentinel ----------------------------------------------------------------------------


SENTINEL_CONFIG = """\
port {port}
bind {host}
dir {dir}
sentinel resolve-hostnames no
sentinel monitor {service} {host} {primary_port} 2
sentinel down-after-milliseconds {service} 1000
sentinel failover-timeout {service} 5000
sentinel parallel-syncs {service} 1
"""


@dataclass(eq=False)
class SentinelTopology:
    """One primary, one replica and three sentinels monitoring them as ``service``."""

    directory: Path
    service: str
    data_nodes: list[NodeProcess] = field(default_factory=list)
    sentinel_nodes: list[NodeProcess] = field(default_factory=list)
    timeout: float = 30.0

    @property
    def sentinels(self) -> list[Address]:
        return [node.address for node in self.sentinel_nodes]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def node(self, address: Address) -> NodeProcess:
        for node in self.data_nodes + self.sentinel_nodes:
            if node.address == address:
                return node
        raise KeyError(f"no node of this group at {address[0]}:{address[1]}")

    def client(self, address: Address, **options: Any) -> redis.Redis:
        return connect(address, **options)

    def master_addresses(self) -> list[Address | None]:
        """What each sentinel answers to get-master-addr-by-name (None: no answer)."""
        seen: list[Address | None] = []
        for address in self.sentinels:
            try:
                reply = _run(address, "SENTINEL", "get-master-addr-by-name", self.service)
            except (redis.RedisError, OSError):
                seen.append(None)
                continue
            seen.append((str(reply[0]), int(reply[1])) if reply else None)
        return seen

    def primary_address(self) -> Address:
        """The primary most answering sentinels report: right after a failover one sentinel
        may still name the old one for a moment."""
        seen = [s for s in self.master_addresses() if s is not None]
        if not seen:
            raise TopologyError(f"no sentinel knows the primary of {self.service!r}")
        return max(seen, key=seen.count)

    def role(self, address: Address) -> str:
        return str(_run(address, "ROLE")[0])

    def kill_primary(self) -> Address:
        """SIGKILL the current primary's process; its address."""
        address = self.primary_address()
        self.node(address).kill()
        return address

    def wait_for_failover(
        self, old: Address, timeout: float = 30.0, every_sentinel: bool = False
    ) -> Address:
        """Wait until most sentinels (or, with ``every_sentinel``, all of them) report a
        primary other than ``old`` that says it is one.

        Most is what a client needs to find the new primary. Before ``old`` comes back, wait
        for every sentinel: one still naming ``old`` would see it answer as a primary again
        and may point the new primary at it, undoing the failover.
        """
        majority = len(self.sentinels) if every_sentinel else len(self.sentinels) // 2 + 1

        def check() -> Address:
            seen = self.master_addresses()
            for candidate in {s for s in seen if s is not None and s != old}:
                if seen.count(candidate) >= majority:
                    role = self.role(candidate)
                    if role != "master":
                        raise NotYet(f"sentinels name {candidate}, whose ROLE is {role}")
                    return candidate
            raise NotYet(f"sentinels report {seen}")

        return poll(
            f"a failover of {self.service!r} away from {old[0]}:{old[1]}",
            check,
            timeout=timeout,
            watch=[n for n in self.data_nodes + self.sentinel_nodes if n.expected_running],
        )

    def restart(self, address: Address) -> NodeProcess:
        """Start a killed (or stopped) data node again with the same args; wait for PING.

        It comes back with its own data, as it was started; the sentinels then reconfigure
        it as a replica of the current primary (see ``wait_for_role``).
        """
        node = self.node(address)
        node.start()
        poll(
            f"{node.name} answering PING after a restart",
            lambda: _answers_ping(node),
            timeout=self.timeout,
            watch=[node],
        )
        return node

    def wait_for_role(self, address: Address, role: str, timeout: float = 30.0) -> None:
        """Wait until ``address`` answers ROLE with ``role`` ("master" or "slave"), and a
        replica's link to its primary is up."""
        node = self.node(address)

        def check() -> bool:
            reply = _run(address, "ROLE")
            if str(reply[0]) != role:
                raise NotYet(f"ROLE is {reply[0]}")
            if role == "slave" and str(reply[3]) != "connected":
                raise NotYet(f"replica link state is {reply[3]}")
            return True

        poll(f"{node.name} taking the role {role}", check, timeout=timeout, watch=[node])

    def _wait_ready(self) -> None:
        primary, replica = self.data_nodes

        def replica_up() -> bool:
            link = _info_fields(_run(replica.address, "INFO", "replication"))
            if link.get("master_link_status") != "up":
                raise NotYet(f"master_link_status:{link.get('master_link_status')}")
            return True

        poll(
            f"{replica.name} syncing with {primary.name}",
            replica_up,
            timeout=self.timeout,
            watch=self.data_nodes,
        )

    def _wait_sentinels(self) -> None:
        def check() -> bool:
            for node in self.sentinel_nodes:
                reply = _run(node.address, "SENTINEL", "get-master-addr-by-name", self.service)
                seen = (str(reply[0]), int(reply[1])) if reply else None
                if seen != self.data_nodes[0].address:
                    raise NotYet(f"{node.name} reports primary {seen}")
                replicas = [
                    _pairs(r) for r in _run(node.address, "SENTINEL", "replicas", self.service)
                ]
                if not any(str(r.get("flags")) == "slave" for r in replicas):
                    flags = [r.get("flags") for r in replicas]
                    raise NotYet(f"{node.name} knows replicas with flags {flags}")
                others = _run(node.address, "SENTINEL", "sentinels", self.service)
                if len(others) != len(self.sentinel_nodes) - 1:
                    raise NotYet(f"{node.name} knows {len(others)} other sentinels")
            return True

        poll(
            "every sentinel knowing the primary, the replica and the other sentinels",
            check,
            timeout=self.timeout,
            watch=self.data_nodes + self.sentinel_nodes,
        )

    def close(self) -> None:
        stop_all(self.sentinel_nodes)  # first: no failover while the data nodes stop
        stop_all(self.data_nodes)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_sentinel_group(
    directory: Path, service: str = "keygate", *, timeout: float = 30.0
) -> SentinelTopology:
    """Start a primary, a replica of it and three sentinels (quorum 2) monitoring it.

    Returns once the replica is in sync and every sentinel knows the primary, the replica and
    the two other sentinels (before that, a failover would not happen).
    """
    directory.mkdir(parents=True, exist_ok=True)
    topology = SentinelTopology(directory.resolve(), service, timeout=timeout)
    root = topology.directory
    try:

        def data_node(role: str, *extra: str) -> Callable[[int], NodeProcess]:
            def make(port: int) -> NodeProcess:
                data_dir = root / f"{role}-{port}"
                data_dir.mkdir(exist_ok=True)
                argv = server_argv(
                    port,
                    data_dir,
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    *extra,
                )
                return NodeProcess(f"{role} :{port}", HOST, port, argv, data_dir / "server.log")

            return make

        primary = _start_node(data_node("primary"))
        topology.data_nodes.append(primary)
        replica = _start_node(data_node("replica", "--replicaof", HOST, str(primary.port)))
        topology.data_nodes.append(replica)
        topology._wait_ready()

        def sentinel(port: int) -> NodeProcess:
            sentinel_dir = root / f"sentinel-{port}"
            sentinel_dir.mkdir(exist_ok=True)
            conf = sentinel_dir / "sentinel.conf"
            conf.write_text(
                SENTINEL_CONFIG.format(
                    port=port,
                    host=HOST,
                    dir=sentinel_dir,
                    service=service,
                    primary_port=primary.port,
                ),
                encoding="utf-8",
            )
            argv = [str(server_binary()), str(conf), "--sentinel"]
            return NodeProcess(f"sentinel :{port}", HOST, port, argv, sentinel_dir / "sentinel.log")

        for _ in range(3):
            topology.sentinel_nodes.append(_start_node(sentinel))
        topology._wait_sentinels()
    except BaseException:
        topology.close()
        raise
    return topology


def target_of_url(url: str) -> Address | str:
    """What a TLS front should forward to for a plain server URL: a unix socket path for
    ``unix://...``, host and port for ``redis://...``."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    if parts.scheme == "redis":
        return (parts.hostname or HOST, parts.port or 6379)
    raise ValueError(f"no TLS front for {url!r}: only unix:// and redis:// servers")


# --- TLS front ---------------------------------------------------------------------------


@dataclass(eq=False)
class TlsFront:
    """A TLS-terminating proxy (its own process) in front of a plain server."""

    directory: Path
    target: Address | str
    require_client_cert: bool
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_file: Path
    client_key_file: Path
    proxy: NodeProcess | None = None

    @property
    def port(self) -> int:
        if self.proxy is None:
            raise TopologyError("the TLS front is not running")
        return self.proxy.port

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    def url(self, params: str = "", *, client_cert: bool | None = None) -> str:
        """A rediss:// URL trusting the front's CA; with the client cert and key when
        ``client_cert`` (default: when the front requires one); ``params`` appended."""
        query = [f"ssl_ca_certs={quote(str(self.ca_file), safe='/')}"]
        if self.require_client_cert if client_cert is None else client_cert:
            query.append(f"ssl_certfile={quote(str(self.client_cert_file), safe='/')}")
            query.append(f"ssl_keyfile={quote(str(self.client_key_file), safe='/')}")
        if params:
            query.append(params.lstrip("&?"))
        return f"rediss://{HOST}:{self.port}/0?" + "&".join(query)

    def client_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            context.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return context

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _write_certs(directory: Path) -> dict[str, Path]:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    client = ca.issue_cert("keygate-client")
    files = {
        "ca": directory / "ca.pem",
        "server_cert": directory / "server.pem",
        "server_key": directory / "server.key",
        "client_cert": directory / "client.pem",
        "client_key": directory / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    for index, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(files["server_cert"]), append=index > 0)
    for index, blob in enumerate(client.cert_chain_pems):
        blob.write_to_path(str(files["client_cert"]), append=index > 0)
    return files


def start_tls_front(
    target: Address | str,
    directory: Path,
    *,
    require_client_cert: bool = False,
    timeout: float = 15.0,
) -> TlsFront:
    """Start a TLS front for ``target`` (host and port, or a unix socket path).

    Writes ca.pem, server.pem/server.key and client.pem/client.key (same CA) to
    ``directory``; returns once the front completes a TLS handshake.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()
    files = _write_certs(directory)
    front = TlsFront(
        directory,
        target,
        require_client_cert,
        ca_file=files["ca"],
        server_cert_file=files["server_cert"],
        server_key_file=files["server_key"],
        client_cert_file=files["client_cert"],
        client_key_file=files["client_key"],
    )
    port_file = directory / "tls-front.port"
    port_file.unlink(missing_ok=True)
    target_arg = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
    argv = [
        sys.executable,
        "-P",  # not tests/ first on sys.path: tests/config etc. would shadow top-level names
        str(Path(__file__).resolve()),
        "tls-front",
        "--port-file",
        str(port_file),
        "--target",
        target_arg,
        "--cert",
        str(files["server_cert"]),
        "--key",
        str(files["server_key"]),
        "--ca",
        str(files["ca"]),
    ]
    if require_client_cert:
        argv.append("--require-client-cert")
    proxy = NodeProcess("TLS front", HOST, 0, argv, directory / "tls-front.log")
    front.proxy = proxy
    try:
        proxy.start()

        def listening() -> int:
            try:
                return int(port_file.read_text())
            except (OSError, ValueError):
                raise NotYet("no port file yet") from None

        proxy.port = poll("the TLS front listening", listening, timeout=timeout, watch=[proxy])
        context = front.client_context(client_cert=True)

        def handshake() -> bool:
            with (
                socket.create_connection(proxy.address, timeout=2.0) as raw,
                context.wrap_socket(raw, server_hostname=HOST) as tls,
            ):
                return tls.version() is not None

        poll("a TLS handshake with the front", handshake, timeout=timeout, watch=[proxy])
    except BaseException:
        front.close()
        raise
    return front


# The proxy process.


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        await writer.wait_closed()


def _write_port_file(path: Path, port: int) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(str(port))
    partial.replace(path)  # atomically: the parent never reads half a number


async def _serve_tls_front(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    if args.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(args.ca)
    target: str = args.target

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            if target.startswith("/"):
                server_r, server_w = await asyncio.open_unix_connection(target)
            else:
                host, _, port = target.rpartition(":")
                server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            print(f"cannot reach {target}: {exc}", flush=True)
            await _close(client_w)
            return
        tasks = [
            asyncio.create_task(_pipe(client_r, server_w)),
            asyncio.create_task(_pipe(server_r, client_w)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await _close(server_w)
            await _close(client_w)

    server = await asyncio.start_server(
        handle, HOST, args.listen_port, ssl=context, ssl_handshake_timeout=10
    )
    port = int(server.sockets[0].getsockname()[1])
    _write_port_file(Path(args.port_file), port)
    print(f"TLS front on {HOST}:{port} -> {target}", flush=True)
    async with server:
        await server.serve_forever()


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests/topologies.py")
    commands = parser.add_subparsers(dest="command", required=True)
    front = commands.add_parser("tls-front", help="TLS-terminating TCP proxy")
    front.add_argument("--listen-port", type=int, default=0)
    front.add_argument("--port-file", required=True)
    front.add_argument("--target", required=True, help="HOST:PORT or a unix socket path")
    front.add_argument("--cert", required=True)
    front.add_argument("--key", required=True)
    front.add_argument("--ca", required=True)
    front.add_argument("--require-client-cert", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_tls_front(args))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
