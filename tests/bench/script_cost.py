"""Redis-side cost of a request, in instructions: the packaged valkey-server runs under
valgrind's callgrind while this harness sends N requests' worth of scripts, one at a time
(authorize, then its settlement), exactly as the proxy builds them. Instructions do not
depend on what else the machine is doing, so two commits can be compared on a busy host
where req/s cannot (docs/benchmarks.md).

    python -m tests.bench.script_cost [--requests 1000] [--mode separate|ride]

``separate``: each settlement is its own settle.lua call (a lone request's path);
``ride``: each settlement goes with the key's next authorization (the path of a busy key).
Prints the instructions the server spent per request, less its start-up and one warm-up
request. Needs valgrind (Debian: apt-get install -y valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from gateway.config.load import build
from gateway.embedded import server_binary
from gateway.policies.limits import RoutePolicy
from gateway.proxy.authorize import SETTLE, Decision, KeyAuthorizer
from gateway.store.cluster_multiplex import multiplexer_for
from gateway.store.connection import connect
from gateway.store.keystore import KeyStore
from gateway.store.names import KeyNames
from gateway.store.record import RateLimitSpec
from tests.procs import free_port

PREFIX = "kgcost:"
# keygate+limits' route and key in tests/bench/proxy_bench.py: a cost rule with a
# reservation, a spending limit and a rate limit that refuse nothing.
ROUTE = {
    "name": "bench",
    "prefix": "/bench",
    "upstream": "bench",
    "scopes": ["bench:read"],
    "cost": {"header": "X-Usage-Cost"},
    "reserve": 0.001,
}
ACTUAL = 500  # micro-units each request is settled at


class _Riders:
    def __init__(self, triples: list[Any]) -> None:
        self.triples = triples


async def _requests(url: str, count: int, mode: str) -> None:
    """One warm-up request, then ``count`` more (none at all when ``count`` is 0)."""
    upstreams = {"bench": {"url": "http://127.0.0.1:9"}}
    settings = build({"redis": {"url": url}, "upstreams": upstreams, "routes": [ROUTE]}, Path())
    client = connect(settings.redis, url)
    store = KeyStore(client, KeyNames(PREFIX), "kg_")
    await store.scripts.load()
    values: dict[str, Any] = {"workspace_id": "bench", "user_id": "bench"}
    values |= {"scopes": ("bench:read",)}
    values |= {"limit_micro": 10**15, "limit_reset": "monthly"}
    issued = await store.create(values | {"rate_limit": RateLimitSpec(10**9, 60)})
    mux = multiplexer_for(settings.redis, url)
    authorizer = KeyAuthorizer(mux, KeyNames(PREFIX), 1000, "kg_")
    policy = RoutePolicy.of(settings.routes[0])
    secret = issued.secret
    assert secret is not None  # a generated key's
    previous: list[Decision] = []
    if mode == "ride":
        authorizer.ride_along = lambda keys: (
            _Riders([previous[-1].entry, ACTUAL, ""]) if previous else None
        )
    try:
        for _ in range(count + 1):
            decision = await authorizer.authorize(secret, policy, "GET")
            assert decision.status == "ok", decision.status
            if mode == "separate":
                await mux.evalsha(SETTLE, decision.settle_keys, ("", decision.entry, ACTUAL, ""))
            previous.append(decision)
    finally:
        await mux.close()
        await client.aclose()


def _instructions(count: int, mode: str) -> int:
    """The server's instructions over its whole life with ``count`` requests (+1 warm-up)."""
    with tempfile.TemporaryDirectory(prefix="kgcost") as root:
        out, port = Path(root) / "callgrind.out", free_port()
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        argv += [str(server_binary()), "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", root]
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_answering(port, server)
            asyncio.run(_requests(f"redis://127.0.0.1:{port}", count, mode))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        found = re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE)
        assert found is not None, "callgrind wrote no summary"
        return int(found.group(1))


def _wait_answering(port: int, server: subprocess.Popen[bytes]) -> None:
    """Until the server answers PING: it starts slowly under valgrind."""
    deadline = time.monotonic() + 60
    while True:
        client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            if client.ping():
                return
        except redis.RedisError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--mode", choices=("separate", "ride"), default="separate")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("script_cost: needs valgrind (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    base = _instructions(0, args.mode)
    total = _instructions(args.requests, args.mode)
    per = (total - base) / args.requests
    print(f"{args.mode}: {per:,.0f} instructions per request ({args.requests} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
