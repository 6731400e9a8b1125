"""Slowloris and file-descriptor exhaustion against a real ``keygate serve``, on loopback.

One command starts a private valkey-server, the benchmark upstream and ``keygate serve``
(1 worker, the documented defaults but for its ports, its route and its Redis) under a
lowered file descriptor limit (``prlimit --nofile``, 1024 by default), then:

1. checks a keyed ``GET /bench`` answers 200 (the baseline);
2. opens N connections (1100 by default, more than 1024 descriptors could hold), half of
   them dripping a request head one byte a second, half sending nothing;
3. while they are open: sends the keyed request again until it gets 200, and asks the
   admin listener's ``/healthz``, which has connections of its own;
4. waits until keygate has closed every slow connection, and reports how many it refused
   at once (over its connection cap), how many it reaped and after how long, the most
   descriptors the keygate process held (from /proc), and keygate's own counts
   (keygate_client_timeouts_total, keygate_client_connections_refused_total).

    python -m tests.bench.slowloris [--connections 1100] [--nofile 1024]
                                    [--header-timeout SECONDS] [--pool-size 100]

The run fails (exit 1, logs kept) if keygate dies, if its descriptors reach the limit, if
the keyed request is not served within the header timeout plus 10 s, if the admin listener
does not answer during the flood, or if a slow connection outlives the header timeout plus
5 s. Every process it started is stopped by pid at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yaml

from gateway.embedded import EmbeddedRedis
from tests.bench.proxy_bench import (
    PATH,
    SCOPE,
    BenchError,
    Processes,
    Started,
    _create_key,
    free_port,
    start_upstream,
    wait_for_port,
)

MAX_CONNECTIONS = 10_000  # a bound on what this harness opens
REAP_SLACK = 5.0  # seconds past the header timeout a slow connection may live
SERVE_SLACK = 10.0  # seconds past the header timeout the keyed request may wait
DEFAULT_HEADER_TIMEOUT = 10.0  # keygate's default (client.header_timeout)


@dataclass
class Slow:
    """One slow connection: when it opened and when keygate closed it (None: still open)."""

    dripping: bool
    opened: float
    closed: float | None = None
    answered: bytes = b""


@dataclass
class Gate:
    started: Started
    port: int
    admin_port: int
    key: str


def start_keygate(
    procs: Processes,
    root: Path,
    upstream_port: int,
    redis_url: str,
    nofile: int,
    header_timeout: float | None,
    pool_size: int,
) -> Gate:
    """``keygate serve`` under ``prlimit --nofile=<nofile>``; client options as shipped
    unless ``header_timeout`` is given."""
    root.mkdir()
    port, admin_port = free_port(), free_port()
    config = root / "keygate.yaml"
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "workers": 1,
        "redis": {"url": redis_url},
        "upstreams": {
            "bench": {"url": f"http://127.0.0.1:{upstream_port}", "pool_size": pool_size}
        },
        "routes": [{"name": "bench", "prefix": PATH, "upstream": "bench", "scopes": [SCOPE]}],
        "log": {"access": False},
    }
    if header_timeout is not None:
        settings["client"] = {"header_timeout": header_timeout}
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    key = _create_key(config, SCOPE)
    argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
    argv += [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    started = procs.start("keygate", argv)
    wait_for_port(port, started)
    wait_for_port(admin_port, started)
    return Gate(started, port, admin_port, key)


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def watch_descriptors(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], descriptors(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def hold(port: int, slow: Slow, head: bytes, done: asyncio.Event) -> None:
    """Keep one slow connection open until keygate closes it (or ``done``)."""
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        slow.closed = loop.time()
        return
    slow.opened = loop.time()
    sent = 0
    try:
        while not done.is_set():
            if slow.dripping and sent < len(head):
                writer.write(head[sent : sent + 1])
                sent += 1
                await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                continue
            slow.answered += chunk
            if not chunk:
                break
    except ConnectionError:
        pass
    finally:
        if slow.closed is None and not done.is_set():
            slow.closed = loop.time()
        writer.transport.abort()


async def keyed_get(session: aiohttp.ClientSession, gate: Gate) -> int:
    headers = {"Authorization": f"Bearer {gate.key}", "Connection": "close"}
    async with session.get(f"http://127.0.0.1:{gate.port}{PATH}", headers=headers) as r:
        await r.read()
        return r.status


async def served(session: aiohttp.ClientSession, gate: Gate, until: float) -> tuple[float, int]:
    """When (loop time) the keyed request got 200, retrying refused connections, and on
    which attempt."""
    loop = asyncio.get_running_loop()
    attempts = 0
    while loop.time() < until:
        attempts += 1
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            if await keyed_get(session, gate) == 200:
                return loop.time(), attempts
        await asyncio.sleep(0.2)
    raise BenchError("the keyed request got no 200 during the flood")


def metric(text: str, name: str, **labels: str) -> float:
    wanted = sorted(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and sorted(match.group(1).split(",")) == wanted:
            return float(match.group(2))
    return 0.0


async def flood(args: argparse.Namespace, gate: Gate, header_timeout: float) -> list[str]:
    """The run itself; the report lines."""
    loop = asyncio.get_running_loop()
    pid = gate.started.process.pid
    client_timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=client_timeout, connector=connector) as session:
        if await keyed_get(session, gate) != 200:
            raise BenchError("the keyed request is not served before the flood")
        baseline = descriptors(pid)
        peak, stop, done = [baseline], asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(watch_descriptors(pid, peak, stop))
        head = b"GET /bench HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 4096
        slows = [Slow(dripping=i % 2 == 0, opened=loop.time()) for i in range(args.connections)]
        started = loop.time()
        holders = [asyncio.create_task(hold(gate.port, s, head, done)) for s in slows]
        try:
            await asyncio.sleep(1.0)  # the keyed request goes out a second into the flood
            held = sum(1 for s in slows if s.closed is None)
            print(f"flood: {held} of {args.connections} connections open at 1 s", file=sys.stderr)
            admin_status = 0
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(f"http://127.0.0.1:{gate.admin_port}/healthz") as r:
                    admin_status = r.status
            until = started + header_timeout + SERVE_SLACK
            served_at, attempts = await served(session, gate, until)
            served_after = served_at - started
            print(f"flood: keyed request served {served_after:.1f}s in", file=sys.stderr)
            # Each holder ends when keygate closes its connection. A connection may open late
            # (its SYN dropped while the listen backlog was full, and retried): each has
            # header_timeout + REAP_SLACK from its own opening.
            pending = set(holders)
            while pending:
                latest = max(s.opened for s in slows) + header_timeout + REAP_SLACK
                if loop.time() >= latest:
                    break
                _, pending = await asyncio.wait(pending, timeout=min(1.0, latest - loop.time()))
            gate.started.process.poll()
            if gate.started.process.returncode is not None:
                raise BenchError(f"keygate exited with {gate.started.process.returncode}")
            async with session.get(f"http://127.0.0.1:{gate.admin_port}/metrics") as r:
                metrics_text = await r.text()
        finally:
            done.set()
            stop.set()
            await asyncio.gather(*holders, watcher, return_exceptions=True)
    still_open = sum(1 for s in slows if s.closed is None)
    refused = sum(1 for s in slows if s.closed is not None and s.closed - s.opened < 0.5)
    # Reaped: closed by keygate after a while (refused ones close within milliseconds); how
    # long each was open, from this harness's connect (which its busy loop may see late).
    lifetimes = [s.closed - s.opened for s in slows if s.closed is not None]
    reaped = [t for t in lifetimes if t >= 0.5]
    answered = sum(1 for s in slows if s.answered)
    head_timeouts = metric(
        metrics_text, "keygate_client_timeouts_total", listener="proxy", phase="head"
    )
    lines = [
        "| | |",
        "|---|---|",
        f"| slow connections opened | {args.connections} ({(args.connections + 1) // 2} dripping "
        f"a head 1 byte/s, {args.connections // 2} silent) |",
        f"| keygate's RLIMIT_NOFILE | {args.nofile} |",
        f"| connection cap (keygate_client_connections_max) | "
        f"{metric(metrics_text, 'keygate_client_connections_max', listener='proxy'):g} |",
        f"| refused at once | {refused} |",
        f"| keygate_client_connections_refused_total (with the keyed request's retries) | "
        f"{metric(metrics_text, 'keygate_client_connections_refused_total', listener='proxy'):g} |",
        f"| reaped by keygate | {len(reaped)}, after {min(reaped, default=0):.1f} / "
        f"{statistics.median(reaped) if reaped else 0:.1f} / {max(reaped, default=0):.1f} s "
        "open (min / median / max) |",
        f'| keygate_client_timeouts_total{{phase="head"}} | {head_timeouts:g} |',
        f"| still open at the end | {still_open} |",
        f"| slow connections that got any bytes back | {answered} |",
        f"| keyed request, sent 1 s into the flood (retried while refused) | 200 on attempt "
        f"{attempts}, {served_after:.1f} s after the flood began |",
        f"| admin /healthz during the flood | {admin_status} |",
        f"| keygate's descriptors | {baseline} before, at most {peak[0]} of {args.nofile} |",
    ]
    if peak[0] >= args.nofile:
        raise BenchError(f"keygate used all {args.nofile} descriptors")
    if admin_status != 200:
        raise BenchError(f"the admin listener answered {admin_status} during the flood")
    if still_open:
        raise BenchError(
            f"{still_open} slow connections outlived {header_timeout + REAP_SLACK:g}s"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1100, help="slow connections (1100)")
    parser.add_argument("--nofile", type=int, default=1024, help="keygate's RLIMIT_NOFILE (1024)")
    parser.add_argument(
        "--header-timeout",
        type=float,
        help=f"client.header_timeout for keygate (default: keygate's, {DEFAULT_HEADER_TIMEOUT:g})",
    )
    parser.add_argument("--pool-size", type=int, default=100, help="upstream pool_size (100)")
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _own_descriptors(needed: int) -> None:
    """Enough descriptors in this process for the slow connections it opens."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"this process may open {hard} files; {needed} are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if shutil.which("prlimit") is None:
        print("slowloris: prlimit (util-linux) is not installed", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="kgslow", dir="/tmp"))  # short: a unix socket lives here
    procs = Processes(root)
    redis: EmbeddedRedis | None = None
    keep = False
    timeout = args.header_timeout or DEFAULT_HEADER_TIMEOUT
    try:
        _own_descriptors(args.connections + 256)
        redis = EmbeddedRedis(root / "redis").start()
        upstream = start_upstream(procs)
        gate = start_keygate(
            procs, root / "keygate", upstream.port, redis.url, args.nofile,
            args.header_timeout, args.pool_size,
        )  # fmt: skip
        lines = asyncio.run(flood(args, gate, timeout))
        print(f"\n## Slowloris ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
        print(
            f"`python -m tests.bench.slowloris --connections {args.connections} "
            f"--nofile {args.nofile} --pool-size {args.pool_size}`"
            + (f" `--header-timeout {args.header_timeout:g}`" if args.header_timeout else "")
            + f"; client.header_timeout {timeout:g} s\n"
        )
        print("\n".join(lines))
        return 0
    except BenchError as exc:
        keep = True
        print(f"\nslowloris: FAILED: {exc}\n(logs kept in {root})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nslowloris: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if redis is not None:
            redis.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
