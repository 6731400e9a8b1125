"""A minimal fast upstream for the proxy benchmark: ``GET /bench`` answers a small JSON body.

aiohttp's low-level server (no router, no middleware, no access log) on uvloop, so the
upstream costs as little CPU as aiohttp allows and every proxy in front of it pays the
same. ``/bench`` and anything under it answers 200 with the same ~100-byte JSON body and
the header ``X-Usage-Cost: 0.0005`` (what the request cost: keygate+limits reads it and
charges the key, then removes it; the other targets pass it through); other paths 404.
It runs in its own process, started by ``proxy_bench``:

    python -m tests.bench.fast_upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import uvloop
from aiohttp import web

BODY = json.dumps(
    {"ok": True, "service": "keygate-bench-upstream", "items": [1, 2, 3, 4, 5], "note": "x" * 24},
    separators=(",", ":"),
).encode()
"""What ``GET /bench`` answers (about 100 bytes); the harness checks it byte for byte."""

COST_HEADER = "X-Usage-Cost"
COST = "0.0005"
"""The cost every ``/bench`` answer reports in ``COST_HEADER`` (credits)."""

_NOT_FOUND = b'{"error":"not found"}'


async def handle(request: web.BaseRequest) -> web.Response:
    path = request.path
    if request.method in ("GET", "HEAD") and (path == "/bench" or path.startswith("/bench/")):
        return web.Response(body=BODY, content_type="application/json", headers={COST_HEADER: COST})
    return web.Response(status=404, body=_NOT_FOUND, content_type="application/json")


async def serve(host: str, port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
