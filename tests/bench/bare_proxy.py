"""A bare aiohttp pass-through proxy: the reference for a Python proxy in the benchmark.

What an honest minimal aiohttp reverse proxy does and nothing more: aiohttp's low-level
server (no router, no middleware, no access log) on uvloop, one shared ``ClientSession``
with a keep-alive pool, hop-by-hop headers dropped both ways, ``X-Forwarded-For`` set, the
request body and the response body streamed (never buffered), 502/504 when the upstream
fails. No authentication, no routing: every request goes to the one upstream.

    python -m tests.bench.bare_proxy --port 9200 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

CHUNK = 65_536
HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",  # the upstream's Host comes from its URL
    )
)
_FORWARDED_FOR = istr("X-Forwarded-For")


def _pass(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k not in HOP_BY_HOP)


class BareProxy:
    def __init__(self, upstream: str, pool_size: int) -> None:
        self.base = upstream.rstrip("/")
        self.pool_size = pool_size
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.session is not None
        headers = _pass(request.headers)
        if request.remote:
            previous = request.headers.get(_FORWARDED_FOR)
            headers[_FORWARDED_FOR] = (
                f"{previous}, {request.remote}" if previous else request.remote
            )
        data = request.content.iter_chunked(CHUNK) if request.body_exists else None
        url = URL(self.base + request.raw_path, encoded=True)
        try:
            async with self.session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            ) as upstream:
                response = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=_pass(upstream.headers)
                )
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except TimeoutError:
            return web.Response(status=504, text="upstream timeout")
        except aiohttp.ClientError:
            return web.Response(status=502, text="upstream unreachable")


async def serve(host: str, port: int, upstream: str, pool_size: int) -> None:
    proxy = BareProxy(upstream, pool_size)
    await proxy.start()
    server = web.Server(proxy.handle, handler_cancellation=True, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
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
        await proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9100")
    parser.add_argument("--pool-size", type=int, default=100, help="keep-alive connections")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream, args.pool_size))


if __name__ == "__main__":
    main()
