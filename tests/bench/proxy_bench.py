"""Proxy benchmark: the upstream direct, a bare aiohttp proxy, nginx and keygate (twice: plain
and with rate limit, spending cap and usage recording on), interleaved.

One command starts everything on loopback, checks every target answers correctly, then
runs wrk against each target in turn, round after round (the order rotates each round so
that drift on the machine hits every target alike), and prints a Markdown table of the
medians over rounds with each target's requests/s as a ratio to the bare aiohttp proxy
(what an honest minimal aiohttp proxy does), plus keygate's standing against its targets:

    python -m tests.bench.proxy_bench [--rounds 6] [--duration 5] [--connections 8,64]
                                      [--threads 1] [--targets ...] [--profile]
                                      [--profile-target keygate|keygate+limits|bare]

Targets, each its own process:

- ``upstream``: tests/bench/fast_upstream.py, ``GET /bench`` -> 100 bytes of JSON and the
  header ``X-Usage-Cost: 0.0005``;
- ``bare``: tests/bench/bare_proxy.py in front of it (no auth);
- ``nginx``: 1 worker, keep-alive to the upstream (skipped, with a message, if not installed);
- ``keygate``: ``python -m gateway serve`` (1 worker) with a route ``prefix: /bench`` that
  requires scope ``bench:read``, a key created with the CLI, and a private valkey-server
  (the packaged binary, unix socket) as its external Redis;
- ``keygate+limits``: a second keygate on the same valkey-server (key prefix ``kgl:``) whose
  route also has ``cost: {header: X-Usage-Cost}`` and ``reserve: 0.001``, and whose key has
  a spending limit and a rate limit (both far too large to refuse anything): every request
  is rate-checked, reserves 0.001 against the limit and is settled at 0.0005 after its
  response;
- ``nginx+keygate-auth``: nginx (1 worker) in front of the upstream, every request first
  asked of a third keygate's auth listener (``auth_request``, keep-alive; 1 worker, key
  prefix ``kga:``) with the same key options and a fixed cost of 0.0005 charged per request.

A run fails (exit 1) if a pre-flight check fails, if wrk reports any non-2xx response or
socket error, if a server process dies, or if keygate+limits' recorded usage is not
exactly 0.0005 per admitted request at the end. ``--profile`` then runs keygate (or
``--profile-target keygate+limits`` or ``bare``) under ``py-spy record`` during one more
wrk run at the largest connection count and prints the functions with the most own time.
Every process started is stopped by its pid at the end, also on Ctrl-C. See
tests/bench/README.md for how to read the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yaml

from gateway.embedded import EmbeddedRedis
from tests.bench.fast_upstream import BODY, COST, COST_HEADER
from tests.procs import server_pid

ROOT = Path(__file__).resolve().parents[2]
PATH = "/bench"
SCOPE = "bench:read"
POOL_SIZE = 100  # keep-alive connections to the upstream, the same for every proxy
START_TIMEOUT = 30.0
PROFILE_RATE = 200  # py-spy samples per second
NGINX_AUTH = "nginx+keygate-auth"
TARGETS = ("upstream", "bare", "nginx", "keygate", "keygate+limits", NGINX_AUTH)
KEYGATES = ("keygate", "keygate+limits")
NGINX_AUTH_KEYGATE = "nginx-auth-keygate"  # the auth listener's process of that target
# What --pin gives CPU 0 (nginx+keygate-auth's nginx and keygate share it).
PROXIES = ("bare", "nginx", *KEYGATES, NGINX_AUTH, NGINX_AUTH_KEYGATE)
OWN_KEY_PATH = "/v1/key"  # keygate's own-key report on the proxy listener
LIMITS_PREFIX = "kgl:"  # keygate+limits' Redis key prefix on the shared valkey-server
RESERVE = 0.001  # credits keygate+limits reserves per request (the upstream reports COST)
# Far above what a run can use: every request is checked and charged, none is refused.
LIMITS_KEY_OPTIONS = (
    "--limit", "1000000000", "--limit-reset", "monthly", "--rate-limit", "1000000000/60"
)  # fmt: skip
MICRO = 1_000_000  # keygate stores money as integer micro-units
COST_MICRO = int(Decimal(COST) * MICRO)
SETTLE_WAIT = 5.0  # seconds to wait for settlements still in flight to land
AUDIT_REQUESTS = 2000  # requests of the exact settlement audit after the rounds


class BenchError(Exception):
    """The benchmark cannot go on; the message says what was seen."""


# ------------------------------------------------------------------------------ processes


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if this harness is killed outright, the
    # kernel sends the child SIGTERM, so nothing it started outlives it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_env() -> dict[str, str]:
    """This environment without KEYGATE_* overrides, which would change keygate's config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


class Processes:
    """Every server process the harness started, stopped by pid in reverse order."""

    def __init__(self, log_dir: Path, pin: bool = False) -> None:
        self.log_dir = log_dir
        self.started: list[Started] = []
        self.pin = pin
        self.redis_pid: int | None = None  # the embedded Redis, whose CPU time runs report

    def cpu_of(self, name: str) -> int | None:
        """With --pin: the proxies measured get CPU 0 to themselves; the load generator,
        the upstream and Redis share CPU 1 (as a proxy's Redis runs elsewhere in
        production). None without --pin."""
        if not self.pin:
            return None
        return 0 if name in PROXIES else 1

    def pinned(self, name: str, argv: Sequence[str]) -> list[str]:
        cpu = self.cpu_of(name)
        return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]

    def start(self, name: str, argv: Sequence[str]) -> Started:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                self.pinned(name, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=_child_env(),
                start_new_session=True,  # Ctrl-C reaches the harness, which stops them in order
                preexec_fn=_die_with_parent,
            )
        started = Started(name, process, log)
        self.started.append(started)
        return started

    def check_alive(self) -> None:
        for s in self.started:
            if s.process.poll() is not None:
                raise BenchError(
                    f"{s.name} (pid {s.process.pid}) exited with code {s.process.returncode}; "
                    f"last lines of {s.log}:\n{_tail(s.log)}"
                )

    def wait(self, started: Started, timeout: float) -> int:
        """Wait for a process that ends by itself, then forget it."""
        code = started.process.wait(timeout)
        self.started.remove(started)
        return code

    def stop_all(self) -> None:
        while self.started:
            _stop(self.started.pop().process)


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Its own process group (start_new_session: group id == its pid) holds only what it
    # started itself, e.g. nginx's worker; make sure none of them is left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, started: Started, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            break
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(
        f"{started.name} did not listen on 127.0.0.1:{port} within {timeout:g}s "
        f"(exit code {started.process.poll()}); last lines of {started.log}:\n{_tail(started.log)}"
    )


# -------------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)
    note: str = ""
    keygate_pid: int | None = None  # the keygate process whose CPU time a run reports

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"


def start_upstream(procs: Processes) -> Target:
    port = free_port()
    s = procs.start(
        "upstream", [sys.executable, "-m", "tests.bench.fast_upstream", "--port", str(port)]
    )
    wait_for_port(port, s)
    return Target("upstream", port, note="direct, no proxy")


def start_bare(procs: Processes, upstream: Target) -> Target:
    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.bare_proxy", "--port", str(port)]
    argv += ["--upstream", f"http://127.0.0.1:{upstream.port}", "--pool-size", str(POOL_SIZE)]
    wait_for_port(port, procs.start("bare", argv))
    return Target("bare", port, note="aiohttp pass-through, no auth")


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive {pool};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def start_nginx(procs: Processes, root: Path, upstream: Target) -> Target | None:
    binary = nginx_binary()
    if binary is None:
        print(
            "nginx: not installed, skipped (Debian: apt-get install -y nginx)",
            file=sys.stderr,
        )
        return None
    root.mkdir()
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(root=root, port=port, upstream_port=upstream.port, pool=POOL_SIZE)
    )
    argv = [binary, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]
    wait_for_port(port, procs.start("nginx", argv))
    return Target("nginx", port, note="1 worker, keep-alive upstream")


NGINX_AUTH_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive {pool};
        keepalive_requests 1000000;
    }}
    upstream keygate_auth {{
        server 127.0.0.1:{auth_port};
        keepalive {pool};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /_keygate {{
            internal;
            proxy_pass http://keygate_auth/auth/nginx;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
        }}
        location / {{
            auth_request /_keygate;
            auth_request_set $kg_key $upstream_http_x_keygate_key_id;
            proxy_set_header X-Keygate-Key-Id $kg_key;
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx_auth(
    procs: Processes, root: Path, upstream: Target, redis_url: str
) -> Target | None:
    """nginx proxying the upstream, each request first authorized by keygate's auth
    listener (``auth_request``): auth, scope, rate limit and a fixed-cost spending cap
    (COST per request, charged when allowed)."""
    binary = nginx_binary()
    if binary is None:
        print(f"{NGINX_AUTH}: nginx not installed, skipped", file=sys.stderr)
        return None
    root.mkdir()
    port, admin_port, auth_port, proxy_port = free_port(), free_port(), free_port(), free_port()
    config = root / "keygate.yaml"
    route = {
        "name": "bench",
        "prefix": PATH,
        "upstream": "bench",
        "methods": ["GET"],
        "scopes": [SCOPE],
        "cost": {"fixed": float(COST)},
    }
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{proxy_port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "auth_listen": f"127.0.0.1:{auth_port}",
        "workers": 1,
        "redis": {"url": redis_url, "key_prefix": "kga:"},
        "upstreams": {"bench": {"url": f"http://127.0.0.1:{upstream.port}"}},
        "routes": [route],
        "log": {"access": False},
    }
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    key = _create_key(config, SCOPE, LIMITS_KEY_OPTIONS)
    keygate = procs.start(
        NGINX_AUTH_KEYGATE,
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
    )
    wait_for_port(auth_port, keygate)
    conf = root / "nginx.conf"
    conf.write_text(
        NGINX_AUTH_CONF.format(
            root=root, port=port, upstream_port=upstream.port, auth_port=auth_port, pool=POOL_SIZE
        )
    )
    argv = [binary, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]
    wait_for_port(port, procs.start(NGINX_AUTH, argv))
    note = "nginx (1 worker) + auth_request to keygate's auth listener (1 worker): "
    note += f"auth + scope, rate limit, spending limit, fixed cost {COST} charged per request"
    headers = {"Authorization": f"Bearer {key}"}
    return Target(NGINX_AUTH, port, headers, note=note, keygate_pid=keygate.process.pid)


@dataclass
class Keygate:
    target: Target
    started: Started
    config: Path
    key: str  # the key wrk sends
    denied_key: str  # a valid key without the route's scope: must get 403
    limits: bool  # keygate+limits: cost rule, reservation, spending and rate limit on


def _create_key(config: Path, scope: str, options: Sequence[str] = ()) -> str:
    argv = [sys.executable, "-m", "gateway", "keys", "create", "--config", str(config)]
    argv += ["--name", f"bench {scope}", "--scope", scope, *options, "--json"]
    done = subprocess.run(
        argv, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise BenchError(
            f"`{' '.join(argv)}` exited with {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    try:
        return str(json.loads(done.stdout)["key"])
    except (ValueError, KeyError) as exc:
        raise BenchError(f"`{' '.join(argv)}` printed no key: {exc}:\n{done.stdout}") from None


def start_keygate(
    procs: Processes, root: Path, upstream: Target, redis_url: str, *, limits: bool = False
) -> Keygate:
    """keygate, or with ``limits`` keygate+limits: the same route plus a cost rule and a
    reservation, its key with a spending limit and a rate limit, its own key prefix on the
    same Redis."""
    name = "keygate+limits" if limits else "keygate"
    root.mkdir()
    port, admin_port = free_port(), free_port()
    config = root / "keygate.yaml"
    route: dict[str, Any] = {
        "name": "bench",
        "prefix": PATH,
        "upstream": "bench",
        "methods": ["GET"],
        "scopes": [SCOPE],
    }
    redis: dict[str, Any] = {"url": redis_url}
    if limits:
        route.update(cost={"header": COST_HEADER}, reserve=RESERVE)
        redis["key_prefix"] = LIMITS_PREFIX
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "workers": 1,
        "redis": redis,
        "upstreams": {
            "bench": {"url": f"http://127.0.0.1:{upstream.port}", "pool_size": POOL_SIZE}
        },
        "routes": [route],
    }
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    key = _create_key(config, SCOPE, LIMITS_KEY_OPTIONS if limits else ())
    denied_key = _create_key(config, "other:read")
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    started = procs.start(name, argv)
    wait_for_port(port, started)
    note = f"auth + scope {SCOPE}, 1 worker"
    if limits:
        note += (
            f", + rate limit, spending limit, reserve {RESERVE:g}, "
            f"cost from {COST_HEADER} settled per request"
        )
    headers = {"Authorization": f"Bearer {key}"}
    target = Target(name, port, headers, note=note, keygate_pid=started.process.pid)
    return Keygate(target, started, config, key, denied_key, limits)


# ------------------------------------------------------------------------------- checking


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def http_get(port: int, headers: dict[str, str], path: str = PATH) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def preflight(targets: Sequence[Target], keygates: Sequence[Keygate]) -> None:
    """Every target answers 200 with the upstream's exact body; each keygate refuses 401/403;
    keygate+limits sends its rate-limit headers, hides the cost header, and has charged the
    key once the pre-flight request is settled."""
    for target in targets:
        reply = http_get(target.port, target.headers)
        if reply.status != 200 or reply.body != BODY:
            raise BenchError(
                f"pre-flight: GET {target.url} through {target.name} answered {reply.status} "
                f"{reply.body[:300]!r}, expected 200 {BODY!r}"
            )
        print(f"pre-flight: {target.name:<14} GET {PATH} -> 200, body ok", file=sys.stderr)
        if target.name == "upstream" and reply.headers.get(COST_HEADER) != COST:
            raise BenchError(
                f"pre-flight: the upstream answered {COST_HEADER}: "
                f"{reply.headers.get(COST_HEADER)!r}, expected {COST!r}"
            )
        if target.name == "keygate+limits":
            _check_limits_headers(reply)
            print(
                f"pre-flight: {target.name:<14} RateLimit-Policy: "
                f"{reply.headers['RateLimit-Policy']}, RateLimit: {reply.headers['RateLimit']}, "
                f"no {COST_HEADER}",
                file=sys.stderr,
            )
    for keygate in keygates:
        checks: tuple[tuple[str, dict[str, str], int], ...] = (
            ("without a key", {}, 401),
            (
                "with a key lacking the scope",
                {"Authorization": f"Bearer {keygate.denied_key}"},
                403,
            ),
        )
        name = keygate.target.name
        for what, headers, expected in checks:
            reply = http_get(keygate.target.port, headers)
            if reply.status != expected:
                raise BenchError(
                    f"pre-flight: {name} GET {PATH} {what} answered {reply.status} "
                    f"{reply.body[:300]!r}, expected {expected}"
                )
            print(f"pre-flight: {name:<14} GET {PATH} {what} -> {reply.status}", file=sys.stderr)
        if keygate.limits:
            # usage > 0 alone would not show a settlement: the reservation alone is RESERVE.
            # After one request settled at COST, usage is exactly COST.
            usage = wait_for_usage(keygate, lambda u: u.usage_micro == COST_MICRO)
            if usage.usage_micro != COST_MICRO or usage.total_uses != 1:
                held = " (the reservation: not settled)" if usage.usage == RESERVE else ""
                raise BenchError(
                    f"pre-flight: {name} GET {OWN_KEY_PATH} shows usage {usage.usage}{held}, "
                    f"total_uses {usage.total_uses} {SETTLE_WAIT:g}s after one request; "
                    f"expected usage {COST} (settled) and total_uses 1"
                )
            print(
                f"pre-flight: {name:<14} GET {OWN_KEY_PATH} -> usage {usage.usage:g}, "
                f"total_uses {usage.total_uses} (settled)",
                file=sys.stderr,
            )


def _check_limits_headers(reply: Reply) -> None:
    missing = [h for h in ("RateLimit-Policy", "RateLimit") if reply.headers.get(h) is None]
    if missing:
        raise BenchError(
            f"pre-flight: keygate+limits answered without {' and '.join(missing)}; "
            f"headers: {dict(reply.headers)}"
        )
    if reply.headers.get(COST_HEADER) is not None:
        raise BenchError(
            f"pre-flight: keygate+limits let the upstream's {COST_HEADER} through to the "
            f"client ({reply.headers.get(COST_HEADER)!r}); it must remove it"
        )


@dataclass
class KeyUsage:
    usage: float  # data.usage: credits charged over all time
    total_uses: int  # data.total_uses: requests admitted

    @property
    def usage_micro(self) -> int:
        return round(Decimal(repr(self.usage)) * MICRO)


def key_usage(keygate: Keygate) -> KeyUsage:
    """``GET /v1/key`` on the keygate's proxy listener with its key."""
    reply = http_get(keygate.target.port, keygate.target.headers, OWN_KEY_PATH)
    try:
        data = json.loads(reply.body)["data"] if reply.status == 200 else None
        if data is not None:
            return KeyUsage(float(data["usage"]), int(data["total_uses"]))
    except (ValueError, KeyError, TypeError):
        pass
    raise BenchError(
        f"{keygate.target.name} GET {OWN_KEY_PATH} answered {reply.status} "
        f"{reply.body[:300]!r}, expected 200 JSON with data.usage and data.total_uses"
    )


def wait_for_usage(keygate: Keygate, done: Callable[[KeyUsage], bool]) -> KeyUsage:
    """The key's usage once ``done`` holds, or after SETTLE_WAIT seconds: settlements are
    written after their response, so the last few may land a moment later."""
    deadline = time.monotonic() + SETTLE_WAIT
    while True:
        usage = key_usage(keygate)
        if done(usage) or time.monotonic() > deadline:
            return usage
        time.sleep(0.05)


def wait_until_still(keygate: Keygate) -> KeyUsage:
    """The key's usage once two readings 0.25 s apart agree (settlements in flight landed)."""
    deadline = time.monotonic() + SETTLE_WAIT
    last = key_usage(keygate)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = key_usage(keygate)
        if now == last:
            break
        last = now
    return last


async def _audit_requests(target: Target, requests: int, concurrency: int) -> int:
    """``requests`` GETs, ``concurrency`` at a time, each read to its end; returns how many
    answered 200 with the exact body and without the cost header."""
    good = 0
    todo = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=target.headers) as session:

        async def worker() -> None:
            nonlocal good
            for _ in todo:
                async with session.get(target.url) as response:
                    body = await response.read()
                    if (
                        response.status == 200
                        and body == BODY
                        and COST_HEADER not in response.headers
                    ):
                        good += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return good


def settlement_audit(keygate: Keygate, requests: int, concurrency: int) -> tuple[bool, str]:
    """After wrk, whose stop cuts off requests in flight (see usage_check), a burst of
    requests that all run to their end: then usage must grow by exactly COST per request."""
    before = wait_until_still(keygate)
    try:
        good = asyncio.run(_audit_requests(keygate.target, requests, concurrency))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise BenchError(f"settlement audit on {keygate.target.name}: {exc!r}") from None
    after = wait_for_usage(
        keygate,
        lambda u: (
            u.usage_micro - before.usage_micro == (u.total_uses - before.total_uses) * COST_MICRO
        ),
    )
    uses = after.total_uses - before.total_uses
    added = after.usage_micro - before.usage_micro
    ok = good == requests and uses == requests and added == requests * COST_MICRO
    return ok, (
        f"- settlement audit: {requests:,} more requests, {concurrency} at a time, each read to "
        f"its end ({good:,} answered 200, exact body, no {COST_HEADER}): total_uses "
        f"+{uses:,}, usage +{added / MICRO:.6f} (expected +{requests * COST_MICRO / MICRO:.6f}) "
        + ("-> exact: each settled once" if ok else "-> WRONG")
    )


def usage_check(
    keygate: Keygate, completed: int, audit: tuple[bool, str] | None = None
) -> tuple[bool, list[str]]:
    """Was every request keygate+limits admitted settled exactly once at COST?

    The naive test, usage == total_uses * COST, does not hold after wrk: when a run ends,
    wrk closes connections with requests in flight. keygate has admitted some of them
    (counted in total_uses, the reservation added to usage); if the client is gone before
    the status line goes out, the settlement refunds the whole reservation (the route's
    charge_failed is false): such a request costs 0. Every other admitted request costs
    COST once settled, or RESERVE if its settlement never came. So what must hold is: usage
    is a whole number of COSTs, at least one per response wrk (or the pre-flight) completed,
    at most one per admitted request. ``audit`` (settlement_audit) is the exact check."""
    usage = wait_until_still(keygate)
    used, admitted = usage.usage_micro, usage.total_uses
    naive = admitted * COST_MICRO
    charged, rest = divmod(used, COST_MICRO)
    consistent = rest == 0 and completed <= charged <= admitted
    lines = [
        f"- final `GET {OWN_KEY_PATH}`: data.usage = {usage.usage:.6f}, "
        f"data.total_uses = {admitted:,}",
        f"- usage == total_uses * {COST}: {usage.usage:.6f} vs {naive / MICRO:.6f}: "
        + (
            "equal"
            if used == naive
            else f"differ by {(used - naive) / MICRO:+.6f} ({(used - naive) / COST_MICRO:+g} "
            "requests' worth)"
        ),
        f"- requests: {admitted:,} admitted (total_uses), {completed:,} completed by wrk, the "
        f"pre-flight and the audit, {admitted - completed:,} in flight when a wrk run ended; "
        f"usage = {charged:,}{'' if rest == 0 else ' + a fraction of'} x {COST}, so "
        f"{admitted - charged:,} admitted request(s) cost nothing (refunded: client gone "
        "before the status line) -> "
        + (
            f"consistent: at least one {COST} per completed request, at most one per "
            "admitted request"
            if consistent
            else f"INCONSISTENT: expected a whole number of {COST}s, "
            f"from {completed:,} to {admitted:,} of them"
        ),
    ]
    ok = consistent
    if audit is not None:
        lines.append(audit[1])
        ok = ok and audit[0]
    return ok, lines


# ------------------------------------------------------------------------------------ wrk


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    output: str
    # CPU time per request (µs) of the target's keygate process and of Redis during the
    # run; None where there is none or it is not this harness's own.
    keygate_us: float | None = None
    redis_us: float | None = None
    machine_us: float | None = None  # every CPU's busy time (wrk, proxies, Redis, kernel)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(output: str) -> WrkResult:
    latency = {
        m.group(1): float(m.group(2)) * _UNITS_MS[m.group(3)] for m in _LATENCY.finditer(output)
    }
    rps, requests = _RPS.search(output), _REQUESTS.search(output)
    if rps is None or requests is None or set(latency) != {"50", "99"}:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    sockets = _SOCKET.search(output)
    counts = [int(n) for n in sockets.groups()] if sockets else [0, 0, 0, 0]
    errors = dict(zip(("connect", "read", "write", "timeout"), counts, strict=True))
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=latency["50"],
        p99_ms=latency["99"],
        requests=int(requests.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors,
        output=output,
    )


def wrk_argv(target: Target, connections: int, duration: float, threads: int) -> list[str]:
    argv = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration:g}s"]
    argv.append("--latency")
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    return [*argv, target.url]


def run_wrk(
    target: Target, connections: int, duration: float, threads: int, procs: Processes
) -> WrkResult:
    argv = procs.pinned("wrk", wrk_argv(target, connections, duration, threads))
    keygate_before, redis_before = cpu_seconds(target.keygate_pid), cpu_seconds(procs.redis_pid)
    machine_before = machine_busy_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    keygate_after, redis_after = cpu_seconds(target.keygate_pid), cpu_seconds(procs.redis_pid)
    machine_after = machine_busy_seconds()
    if done.returncode != 0:
        raise BenchError(
            f"wrk exited with {done.returncode} on {target.name}:\n{done.stdout}{done.stderr}"
        )
    result = parse_wrk(done.stdout)
    result.keygate_us = _per_request(keygate_before, keygate_after, result.requests)
    result.redis_us = _per_request(redis_before, redis_after, result.requests)
    result.machine_us = _per_request(machine_before, machine_after, result.requests)
    procs.check_alive()
    problems = []
    if result.non_2xx:
        problems.append(f"{result.non_2xx} non-2xx responses")
    if any(result.socket_errors.values()):
        problems.append(f"socket errors {result.socket_errors}")
    if problems:
        raise BenchError(
            f"{target.name} at {connections} connections: {', '.join(problems)} "
            f"out of {result.requests} requests; the benchmark measures only successful "
            f"responses. wrk output:\n{result.output}"
        )
    return result


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc); None without one."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs have spent busy so far (user, nice, system, irq, softirq,
    steal in /proc/stat); None off Linux."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = sum(int(first[i]) for i in (1, 2, 3, 6, 7, 8))
    return ticks / os.sysconf("SC_CLK_TCK")


def _per_request(before: float | None, after: float | None, requests: int) -> float | None:
    if before is None or after is None or not requests:
        return None
    return (after - before) * 1e6 / requests


# -------------------------------------------------------------------------------- reports


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


Results = dict[tuple[str, int], list[WrkResult]]


def table(targets: Sequence[Target], connections: Sequence[int], results: Results) -> str:
    """Medians over rounds; the ratio is the median of each round's ratio to the bare proxy
    in the same round, so slow drift of the machine cancels out."""
    lines = [
        "| target | conns | req/s | p50 ms | p99 ms | req/s vs bare | req/s min-max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in connections:
        bare = results.get(("bare", c), [])
        for t in targets:
            runs = results.get((t.name, c), [])
            if not runs:
                continue
            ratios = [r.rps / b.rps for r, b in zip(runs, bare, strict=False) if b.rps]
            ratio = f"{_median(ratios):.2f}" if ratios else "n/a"
            rps = [r.rps for r in runs]
            lines.append(
                f"| {t.name} | {c} | {_median(rps):,.0f} | {_median([r.p50_ms for r in runs]):.2f} "
                f"| {_median([r.p99_ms for r in runs]):.2f} | {ratio} "
                f"| {min(rps):,.0f}-{max(rps):,.0f} |"
            )
    return "\n".join(lines)


def cpu_table(targets: Sequence[Target], connections: Sequence[int], results: Results) -> str:
    """CPU time per request of each target's keygate process and of Redis (medians over
    rounds): what a keygate core and a Redis core each serve, whatever else shares the
    machine."""
    lines = [
        "| target | conns | keygate CPU µs/req | Redis CPU µs/req | all CPUs µs/req |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in connections:
        for t in targets:
            runs = results.get((t.name, c), [])
            keygate = [r.keygate_us for r in runs if r.keygate_us is not None]
            redis = [r.redis_us for r in runs if r.redis_us is not None]
            machine = [r.machine_us for r in runs if r.machine_us is not None]
            if not machine:
                continue
            lines.append(
                f"| {t.name} | {c} | {_shown(keygate)} | {_shown(redis)} | {_shown(machine)} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _shown(values: Sequence[float]) -> str:
    return f"{_median(values):.1f}" if values else "n/a"


# Requests/s against bare at 64 connections: issue 3's target for keygate, issue 4's for
# keygate with limits on. The p50 target (issue 3) is keygate's alone.
RPS_TARGETS = {"keygate": 0.80, "keygate+limits": 0.75}
NGINX_AUTH_TARGET = 2.0  # issue 17: nginx+keygate-auth / keygate+limits req/s at 64


def verdict(results: Results) -> list[str]:
    """The issues' targets for each keygate target; then what the limits cost over keygate."""
    lines = []
    for name in KEYGATES:
        kg64, bare64 = results.get((name, 64), []), results.get(("bare", 64), [])
        if kg64 and bare64:
            ratio = _median([k.rps / b.rps for k, b in zip(kg64, bare64, strict=False)])
            target = RPS_TARGETS[name]
            status = "met" if ratio >= target else "NOT met"
            lines.append(
                f"- {name} / bare req/s at 64 connections: {ratio:.2f} "
                f"(target >= {target:.2f}: {status})"
            )
        kg8, bare8 = results.get((name, 8), []), results.get(("bare", 8), [])
        if kg8 and bare8 and name == "keygate":
            delta = _median([k.p50_ms - b.p50_ms for k, b in zip(kg8, bare8, strict=False)])
            status = "met" if delta <= 0.5 else "NOT met"
            lines.append(
                f"- {name} p50 - bare p50 at 8 connections: {delta:+.2f} ms "
                f"(target <= +0.50 ms: {status})"
            )
    auth64, limits64 = results.get((NGINX_AUTH, 64), []), results.get(("keygate+limits", 64), [])
    if auth64 and limits64:
        ratio = _median([a.rps / k.rps for a, k in zip(auth64, limits64, strict=False)])
        status = "met" if ratio >= NGINX_AUTH_TARGET else "NOT met"
        lines.append(
            f"- {NGINX_AUTH} / keygate+limits req/s at 64 connections: {ratio:.2f} "
            f"(target >= {NGINX_AUTH_TARGET:.2f}: {status})"
        )
        auth_cpu = [a.keygate_us for a in auth64 if a.keygate_us]
        limits_cpu = [k.keygate_us for k in limits64 if k.keygate_us]
        if auth_cpu and limits_cpu:
            lines.append(
                f"- keygate CPU per request at 64 connections: keygate+limits "
                f"{_median(limits_cpu):.1f} µs, {NGINX_AUTH}'s auth listener "
                f"{_median(auth_cpu):.1f} µs: a keygate core authorizes "
                f"{_median(limits_cpu) / _median(auth_cpu):.2f}x the requests behind nginx "
                "that it proxies itself"
            )
        auth_all = [a.machine_us - a.keygate_us for a in auth64 if a.machine_us and a.keygate_us]
        limits_all = [k.machine_us for k in limits64 if k.machine_us]
        if auth_all and limits_all:
            lines.append(
                f"- the machine's CPU per request: keygate+limits {_median(limits_all):.1f} µs; "
                f"{NGINX_AUTH} without its keygate {_median(auth_all):.1f} µs, so where every "
                "process shares these CPUs the req/s ratio stays under "
                f"{_median(limits_all) / _median(auth_all):.2f} even for a check costing nothing"
            )
    for c in sorted({c for name, c in results if name == "keygate+limits"}):
        limited, plain = results.get(("keygate+limits", c), []), results.get(("keygate", c), [])
        if limited and plain:
            ratio = _median([k.rps / b.rps for k, b in zip(limited, plain, strict=False)])
            delta = _median([k.p50_ms - b.p50_ms for k, b in zip(limited, plain, strict=False)])
            lines.append(
                f"- keygate+limits vs keygate at {c} connections: req/s x{ratio:.2f}, "
                f"p50 {delta:+.2f} ms (medians of per-round ratios and differences)"
            )
    return lines


def _version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].split(" Copyright")[0] if text else "?"


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# -------------------------------------------------------------------------------- profile


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def profile_target(
    target: Target, procs: Processes, root: Path, connections: int, duration: float, threads: int
) -> None:
    """py-spy on this Python proxy's process during one more wrk run against it."""
    binary = py_spy_binary()
    if binary is None:
        print(
            "\n--profile: py-spy is not installed; `pip install py-spy` into the venv",
            file=sys.stderr,
        )
        return
    out = root / "py-spy.txt"
    seconds = int(duration) + 2  # the whole wrk run; idle samples are not recorded anyway
    # nginx+keygate-auth: the Python process is its keygate, behind nginx.
    sampled = NGINX_AUTH_KEYGATE if target.name == NGINX_AUTH else target.name
    pid = next(s.process.pid for s in procs.started if s.name == sampled)
    argv = [binary, "record", "--pid", str(pid), "--duration", str(seconds)]
    argv += ["--rate", str(PROFILE_RATE), "--format", "raw", "--nolineno", "--output", str(out)]
    spy = procs.start("py-spy", argv)
    time.sleep(1.0)  # let it attach before the load starts
    if spy.process.poll() is not None:
        raise BenchError(f"py-spy exited at start:\n{_tail(spy.log)}")
    result = run_wrk(target, connections, duration, threads, procs)
    code = procs.wait(spy, timeout=seconds + 60)
    if code != 0 or not out.is_file():
        raise BenchError(f"py-spy exited with {code}:\n{_tail(spy.log)}")
    print(
        f"\n### py-spy: {target.name} during one wrk run at {connections} connections "
        f"for {duration:g}s ({result.rps:,.0f} req/s while sampled at {PROFILE_RATE} Hz)\n"
    )
    print(own_time_report(out.read_text()))
    kept = Path(tempfile.gettempdir()) / f"keygate-py-spy-{target.name}.txt"
    shutil.copyfile(out, kept)  # the run's directory goes; the raw stacks stay for a look
    print(f"\n(raw collapsed stacks: {kept})")


def own_time_report(collapsed: str, top: int = 15) -> str:
    """Functions by own (leaf) samples, with their inclusive share; then own time by package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(py-spy recorded no samples)"
    lines = [
        f"{total} samples (idle excluded)\n",
        "| # | function (file) | own % | total % |",
        "|---:|---|---:|---:|",
    ]
    for i, (frame, count) in enumerate(own.most_common(top), 1):
        name = frame.replace("|", "\\|")
        lines.append(
            f"| {i} | `{name}` | {100 * count / total:.1f} | {100 * inclusive[frame] / total:.1f} |"
        )
    packages: Counter[str] = Counter()
    for frame, count in own.items():
        packages[_package(frame)] += count
    lines += [
        "",
        "Own time by package: "
        + ", ".join(
            f"{name} {100 * count / total:.0f}%" for name, count in packages.most_common(8)
        ),
    ]
    return "\n".join(lines)


def _package(frame: str) -> str:
    match = re.search(r"\(([^()]*)\)\s*$", frame)
    path = match.group(1) if match else frame
    parts = [p for p in re.split(r"[/\\]", path) if p]
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "lib" in parts and any(p.startswith("python3") for p in parts):
        return "stdlib"
    return parts[0].removesuffix(".py") if parts else "?"


# ----------------------------------------------------------------------------------- main


def _connections(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("connection counts must be >= 1")
    return values


def _targets(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(TARGETS)}"
        )
    return [t for t in TARGETS if t in names]  # the usual order, each once


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.proxy_bench",
        description="Interleaved wrk benchmark: upstream, bare aiohttp proxy, nginx, keygate, "
        "keygate+limits.",
    )
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument(
        "--connections", type=_connections, default=[8, 64], help="comma-separated (default 8,64)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="wrk threads, the same for every run (default 1)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2, help="seconds of unrecorded load per target first"
    )
    parser.add_argument(
        "--targets",
        type=_targets,
        default=list(TARGETS),
        help=f"comma-separated subset to measure (default all: {','.join(TARGETS)}); "
        "ratios need bare",
    )
    parser.add_argument("--profile", action="store_true", help="then profile keygate with py-spy")
    parser.add_argument(
        "--profile-target",
        choices=("bare", *KEYGATES, NGINX_AUTH),
        default="keygate",
        help="which Python proxy --profile samples (default keygate)",
    )
    parser.add_argument(
        "--profile-duration", type=float, default=10, help="seconds of the profiled run (10)"
    )
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out (as --targets)")
    parser.add_argument(
        "--redis-url",
        help="keygate's Redis (e.g. a redis+cluster:// URL) instead of an embedded server",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="proxies on CPU 0 alone; wrk, the upstream and Redis on CPU 1 (needs 2 CPUs)",
    )
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.profile and args.profile_target not in args.targets:
        parser.error(f"--profile-target {args.profile_target} is not among --targets")
    if shutil.which("wrk") is None:
        print(
            "proxy_bench: wrk is not installed; it is the load generator "
            "(Debian: apt-get install -y wrk)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)  # stop everything on SIGTERM as on Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    root = Path(tempfile.mkdtemp(prefix="kgbench", dir="/tmp"))  # short: a unix socket lives here
    procs = Processes(root, pin=args.pin)
    redis: EmbeddedRedis | None = None
    keep = False
    try:
        if args.redis_url:
            return _bench(args, procs, root, args.redis_url)
        if any(name in (*KEYGATES, NGINX_AUTH) for name in args.targets):  # one for all
            redis = EmbeddedRedis(root / "redis").start()
            cpu = procs.cpu_of("redis")
            procs.redis_pid = server_pid(redis.socket_path)
            if cpu is not None:
                os.sched_setaffinity(procs.redis_pid, {cpu})
        return _bench(args, procs, root, redis.url if redis is not None else "")
    except BenchError as exc:
        keep = True
        print(f"\nproxy_bench: FAILED: {exc}\n(logs kept in {root})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nproxy_bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if redis is not None:
            redis.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _bench(args: argparse.Namespace, procs: Processes, root: Path, redis_url: str) -> int:
    wanted: list[str] = args.targets
    upstream = start_upstream(procs)  # always: every proxy forwards to it
    bare = start_bare(procs, upstream) if "bare" in wanted else None
    nginx = None
    if "nginx" in wanted and not args.no_nginx:
        nginx = start_nginx(procs, root / "nginx", upstream)
    keygates = [
        start_keygate(procs, root / name, upstream, redis_url, limits=name == "keygate+limits")
        for name in KEYGATES
        if name in wanted
    ]
    nginx_auth = None
    if NGINX_AUTH in wanted and not args.no_nginx:
        nginx_auth = start_nginx_auth(procs, root / "nginx-auth", upstream, redis_url)
    by_name = {t.name: t for t in (upstream, bare, nginx, nginx_auth) if t is not None}
    by_name.update((k.target.name, k.target) for k in keygates)
    targets = [by_name[name] for name in TARGETS if name in wanted and name in by_name]
    preflight(targets, keygates)
    completed: Counter[str] = Counter({t.name: 1 for t in targets})  # the pre-flight GET

    connections: list[int] = args.connections
    high = max(connections)
    if args.warmup > 0:
        for t in targets:
            completed[t.name] += run_wrk(t, high, args.warmup, args.threads, procs).requests
        print(f"warm-up: {args.warmup:g}s at {high} connections per target", file=sys.stderr)

    results: Results = {}
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    for r in range(args.rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for c in connections:
            for t in order:
                res = run_wrk(t, c, args.duration, args.threads, procs)
                results.setdefault((t.name, c), []).append(res)
                completed[t.name] += res.requests
                print(
                    f"round {r + 1}/{args.rounds}  c={c:<3} {t.name:<14} {res.rps:>9,.0f} req/s  "
                    f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:6.2f} ms",
                    file=sys.stderr,
                )
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()[0]
    limited = next((k for k in keygates if k.limits), None)
    usage_ok = True
    usage_lines: list[str] = []
    if limited is not None:
        audit = settlement_audit(limited, AUDIT_REQUESTS, high)
        completed[limited.target.name] += AUDIT_REQUESTS
        usage_ok, usage_lines = usage_check(limited, completed[limited.target.name], audit)

    total_requests = sum(r.requests for runs in results.values() for r in runs)
    total_non_2xx = sum(r.non_2xx for runs in results.values() for r in runs)
    print(f"\n## Proxy benchmark ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
    print(
        f"`python -m tests.bench.proxy_bench --rounds {args.rounds} --duration {args.duration:g} "
        f"--connections {','.join(map(str, connections))} --threads {args.threads}"
        + ("" if wanted == list(TARGETS) else f" --targets {','.join(wanted)}")
        + (f" --profile --profile-target {args.profile_target}" if args.profile else "")
        + (" --pin" if args.pin else "")
        + "`\n"
    )
    print(
        f"- machine: {os.cpu_count()} CPUs ({_cpu()}), {platform.system()} "
        f"{platform.release()}; "
        + (
            "proxies pinned to CPU 0, wrk, upstream and Redis to CPU 1"
            if args.pin
            else "nothing pinned"
        )
        + "; everything on loopback; load average "
        f"{load_before:.2f} before measuring, {load_after:.2f} after (other work on the "
        "machine shows here)"
    )
    print(
        f"- load: {_version(['wrk', '-v'])}, `-t{args.threads}` for every run, "
        f"{args.duration:g}s per run, {args.rounds} interleaved rounds "
        f"(order rotated each round), {elapsed:.0f}s of measuring"
    )
    print(
        f"- software: Python {platform.python_version()}, aiohttp {aiohttp.__version__}, uvloop; "
        + (_version([nginx_binary() or "nginx", "-v"]) if nginx else "nginx not measured")
    )
    print("- targets: " + "; ".join(f"{t.name} = {t.note}" for t in targets))
    print(
        f"- {total_requests:,} requests measured, non-2xx responses: {total_non_2xx}, "
        "socket errors: 0 (any would have failed the run)\n"
    )
    print(table(targets, connections, results))
    print("\nMedians over rounds; `req/s vs bare` is the median of per-round ratios.")
    cpu = cpu_table(targets, connections, results)
    if cpu:
        print(f"\n{cpu}\n")
    for line in verdict(results):
        print(line)
    if usage_lines:
        print(f"\n### keygate+limits: usage recorded (each response costs {COST})\n")
        for line in usage_lines:
            print(line)
    if args.profile:
        profile_target(
            by_name[args.profile_target], procs, root, high, args.profile_duration, args.threads
        )
    if not usage_ok:
        raise BenchError("keygate+limits' recorded usage is wrong (see the report above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
