"""Proxy benchmark: the upstream direct, a bare aiohttp proxy, nginx and keygate, interleaved.

One command starts everything on loopback, checks every target answers correctly, then
runs wrk against each target in turn, round after round (the order rotates each round so
that drift on the machine hits every target alike), and prints a Markdown table of the
medians over rounds with each target's requests/s as a ratio to the bare aiohttp proxy
(the floor for any Python proxy), plus keygate's standing against its targets (issue 3):

    python -m tests.bench.proxy_bench [--rounds 6] [--duration 5] [--connections 8,64]
                                      [--threads 1] [--profile]

Targets, each its own process:

- ``upstream``: tests/bench/fast_upstream.py, ``GET /bench`` -> 100 bytes of JSON;
- ``bare``: tests/bench/bare_proxy.py in front of it (no auth);
- ``nginx``: 1 worker, keep-alive to the upstream (skipped, with a message, if not installed);
- ``keygate``: ``python -m gateway serve`` (1 worker) with a route ``prefix: /bench`` that
  requires scope ``bench:read``, a key created with the CLI, and a private valkey-server
  (the packaged binary, unix socket) as its external Redis.

A run fails (exit 1) if a pre-flight check fails, if wrk reports any non-2xx response or
socket error, or if a server process dies. ``--profile`` then runs keygate under
``py-spy record`` during one more wrk run at the largest connection count and prints the
functions with the most own time. Every process started is stopped by its pid at the end,
also on Ctrl-C. See tests/bench/README.md for how to read the numbers.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yaml

from gateway.embedded import EmbeddedRedis
from tests.bench.fast_upstream import BODY

ROOT = Path(__file__).resolve().parents[2]
PATH = "/bench"
SCOPE = "bench:read"
POOL_SIZE = 100  # keep-alive connections to the upstream, the same for every proxy
START_TIMEOUT = 30.0
PROFILE_RATE = 200  # py-spy samples per second


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

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Started] = []

    def start(self, name: str, argv: Sequence[str]) -> Started:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
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


@dataclass
class Keygate:
    target: Target
    started: Started
    config: Path
    denied_key: str  # a valid key without the route's scope: must get 403


def _create_key(config: Path, scope: str) -> str:
    argv = [sys.executable, "-m", "gateway", "keys", "create", "--config", str(config)]
    argv += ["--name", f"bench {scope}", "--scope", scope, "--json"]
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


def start_keygate(procs: Processes, root: Path, upstream: Target, redis_url: str) -> Keygate:
    root.mkdir()
    port, admin_port = free_port(), free_port()
    config = root / "keygate.yaml"
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "workers": 1,
        "redis": {"url": redis_url},
        "upstreams": {
            "bench": {"url": f"http://127.0.0.1:{upstream.port}", "pool_size": POOL_SIZE}
        },
        "routes": [
            {
                "name": "bench",
                "prefix": PATH,
                "upstream": "bench",
                "methods": ["GET"],
                "scopes": [SCOPE],
            }
        ],
    }
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    key = _create_key(config, SCOPE)
    denied_key = _create_key(config, "other:read")
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    started = procs.start("keygate", argv)
    wait_for_port(port, started)
    target = Target(
        "keygate",
        port,
        {"Authorization": f"Bearer {key}"},
        note=f"auth + scope {SCOPE}, 1 worker",
    )
    return Keygate(target, started, config, denied_key)


# ------------------------------------------------------------------------------- checking


def http_get(port: int, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def preflight(targets: Sequence[Target], keygate: Keygate) -> None:
    """Every target answers 200 with the upstream's exact body; keygate refuses 401/403."""
    for target in targets:
        status, body = http_get(target.port, target.headers)
        if status != 200 or body != BODY:
            raise BenchError(
                f"pre-flight: GET {target.url} through {target.name} answered {status} "
                f"{body[:300]!r}, expected 200 {BODY!r}"
            )
        print(f"pre-flight: {target.name:<8} GET {PATH} -> 200, body ok", file=sys.stderr)
    checks = (
        ("without a key", {}, 401),
        ("with a key lacking the scope", {"Authorization": f"Bearer {keygate.denied_key}"}, 403),
    )
    for what, headers, expected in checks:
        status, body = http_get(keygate.target.port, headers)
        if status != expected:
            raise BenchError(
                f"pre-flight: keygate GET {PATH} {what} answered {status} {body[:300]!r}, "
                f"expected {expected}"
            )
        print(f"pre-flight: keygate  GET {PATH} {what} -> {status}", file=sys.stderr)


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
    argv = wrk_argv(target, connections, duration, threads)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise BenchError(
            f"wrk exited with {done.returncode} on {target.name}:\n{done.stdout}{done.stderr}"
        )
    result = parse_wrk(done.stdout)
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
            rps = [r.rps for r in runs]
            lines.append(
                f"| {t.name} | {c} | {_median(rps):,.0f} | {_median([r.p50_ms for r in runs]):.2f} "
                f"| {_median([r.p99_ms for r in runs]):.2f} | {_median(ratios):.2f} "
                f"| {min(rps):,.0f}-{max(rps):,.0f} |"
            )
    return "\n".join(lines)


def verdict(results: Results) -> list[str]:
    lines = []
    kg64, bare64 = results.get(("keygate", 64), []), results.get(("bare", 64), [])
    if kg64 and bare64:
        ratio = _median([k.rps / b.rps for k, b in zip(kg64, bare64, strict=False)])
        status = "met" if ratio >= 0.80 else "NOT met"
        lines.append(
            f"- keygate / bare req/s at 64 connections: {ratio:.2f} (target >= 0.80: {status})"
        )
    kg8, bare8 = results.get(("keygate", 8), []), results.get(("bare", 8), [])
    if kg8 and bare8:
        delta = _median([k.p50_ms - b.p50_ms for k, b in zip(kg8, bare8, strict=False)])
        status = "met" if delta <= 0.5 else "NOT met"
        lines.append(
            f"- keygate p50 - bare p50 at 8 connections: {delta:+.2f} ms "
            f"(target <= +0.50 ms: {status})"
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


def profile_keygate(
    keygate: Keygate, procs: Processes, root: Path, connections: int, duration: float, threads: int
) -> None:
    binary = py_spy_binary()
    if binary is None:
        print(
            "\n--profile: py-spy is not installed; `pip install py-spy` into the venv",
            file=sys.stderr,
        )
        return
    out = root / "py-spy.txt"
    seconds = int(duration) + 2  # the whole wrk run; idle samples are not recorded anyway
    argv = [binary, "record", "--pid", str(keygate.started.process.pid), "--duration", str(seconds)]
    argv += ["--rate", str(PROFILE_RATE), "--format", "raw", "--nolineno", "--output", str(out)]
    spy = procs.start("py-spy", argv)
    time.sleep(1.0)  # let it attach before the load starts
    if spy.process.poll() is not None:
        raise BenchError(f"py-spy exited at start:\n{_tail(spy.log)}")
    result = run_wrk(keygate.target, connections, duration, threads, procs)
    code = procs.wait(spy, timeout=seconds + 60)
    if code != 0 or not out.is_file():
        raise BenchError(f"py-spy exited with {code}:\n{_tail(spy.log)}")
    print(
        f"\n### py-spy: keygate during one wrk run at {connections} connections "
        f"for {duration:g}s ({result.rps:,.0f} req/s while sampled at {PROFILE_RATE} Hz)\n"
    )
    print(own_time_report(out.read_text()))


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.proxy_bench",
        description="Interleaved wrk benchmark: upstream, bare aiohttp proxy, nginx, keygate.",
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
    parser.add_argument("--profile", action="store_true", help="then profile keygate with py-spy")
    parser.add_argument(
        "--profile-duration", type=float, default=10, help="seconds of the profiled run (10)"
    )
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    procs = Processes(root)
    redis: EmbeddedRedis | None = None
    keep = False
    try:
        redis = EmbeddedRedis(root / "redis").start()
        return _bench(args, procs, root, redis.url)
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
    upstream = start_upstream(procs)
    bare = start_bare(procs, upstream)
    nginx = None if args.no_nginx else start_nginx(procs, root / "nginx", upstream)
    keygate = start_keygate(procs, root / "keygate", upstream, redis_url)
    targets = [t for t in (upstream, bare, nginx, keygate.target) if t is not None]
    preflight(targets, keygate)

    connections: list[int] = args.connections
    high = max(connections)
    if args.warmup > 0:
        for t in targets:
            run_wrk(t, high, args.warmup, args.threads, procs)
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
                print(
                    f"round {r + 1}/{args.rounds}  c={c:<3} {t.name:<8} {res.rps:>9,.0f} req/s  "
                    f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:6.2f} ms",
                    file=sys.stderr,
                )
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()[0]

    total_requests = sum(r.requests for runs in results.values() for r in runs)
    total_non_2xx = sum(r.non_2xx for runs in results.values() for r in runs)
    print(f"\n## Proxy benchmark ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
    print(
        f"`python -m tests.bench.proxy_bench --rounds {args.rounds} --duration {args.duration:g} "
        f"--connections {','.join(map(str, connections))} --threads {args.threads}"
        + (" --profile" if args.profile else "")
        + "`\n"
    )
    print(
        f"- machine: {os.cpu_count()} CPUs ({_cpu()}), {platform.system()} "
        f"{platform.release()}; nothing pinned; everything on loopback; load average "
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
    for line in verdict(results):
        print(line)
    if args.profile:
        profile_keygate(keygate, procs, root, high, args.profile_duration, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
