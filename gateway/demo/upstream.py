"""A sample upstream: a JSON echo service and deterministic OpenAI and Anthropic LLM APIs.

``keygate demo`` puts the gateway in front of it, and the test-suite uses it as a real
upstream. Everything it answers is deterministic, so a test can assert on exact bytes:

- ``/echo`` and ``/echo/{tail}`` (any method): what arrived (method, raw path, query, every
  header, body). ``?discard=1`` answers only the body's size and sha256; bodies are read as a
  stream either way, so a very large upload costs no memory.
- ``/echo/status/{code}``, ``/echo/slow?seconds=S``, ``/echo/stream?chunks=N&interval=S``.
- OpenAI: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses`` (JSON or
  a stream), ``POST /v1/embeddings`` and ``GET /v1/models``; Anthropic: ``POST /v1/messages``.
  The reply echoes the last user message; tokens are words; usage blocks are the real
  APIs' (the rules, the test headers and ``expected_usage`` are in
  ``gateway.demo.llm_usage``). A chat answer also states its cost in credits up front in
  ``X-Usage-Cost`` (``total_tokens * COST_PER_TOKEN``).

Run it alone with ``python -m gateway.demo.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

from aiohttp import web

from gateway.demo.anthropic_api import messages
from gateway.demo.chat import (
    COST_PER_TOKEN,
    MODELS,
    STREAM_DELAY,
    chat_completions,
    completions,
    list_models,
)
from gateway.demo.echo import ECHO_BODY_LIMIT, echo, echo_slow, echo_status, echo_stream
from gateway.demo.embeddings import embeddings
from gateway.demo.responses_api import responses

__all__ = [
    "COST_PER_TOKEN",
    "ECHO_BODY_LIMIT",
    "MODELS",
    "STREAM_DELAY",
    "build_upstream_app",
    "main",
    "start_upstream",
]


def build_upstream_app() -> web.Application:
    """The sample upstream's routes; aiohttp resolves the longest literal prefix first."""
    app = web.Application()
    app.router.add_route("*", r"/echo/status/{code:\d{3}}", echo_status)
    app.router.add_route("*", "/echo/slow", echo_slow)
    app.router.add_route("*", "/echo/stream", echo_stream)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", list_models)
    return app


async def start_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve the sample upstream on ``host:port`` (0: any free port) -> (runner, bound port).

    The caller stops it with ``await runner.cleanup()``; requests still running then get
    two seconds to finish.
    """
    runner = web.AppRunner(build_upstream_app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, int(bound)


async def _serve(host: str, port: int) -> None:
    runner, bound = await start_upstream(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(f"keygate demo upstream listening on http://{shown}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m gateway.demo.upstream [--host H] [--port P]``; stops on SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo.upstream",
        description="Serve keygate's sample upstream (JSON echo, OpenAI and Anthropic APIs).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=9000, help="port (0: any free port)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
