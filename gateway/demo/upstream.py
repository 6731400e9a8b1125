"""A sample upstream: a JSON echo service and an OpenAI-compatible chat API.

``keygate demo`` puts the gateway in front of it, and the test-suite uses it as a real
upstream. Everything it answers is deterministic, so a test can assert on exact bytes:

- ``/echo`` and ``/echo/{tail}`` (any method): what arrived (method, raw path, query, every
  header, body). ``?discard=1`` answers only the body's size and sha256; bodies are read as a
  stream either way, so a very large upload costs no memory.
- ``/echo/status/{code}``, ``/echo/slow?seconds=S``, ``/echo/stream?chunks=N&interval=S``.
- ``POST /v1/chat/completions`` (JSON or SSE with ``stream: true``) and ``GET /v1/models``.
  The reply echoes the last user message; tokens are words; the cost in credits is sent
  up front in ``X-Usage-Cost`` (``total_tokens * COST_PER_TOKEN``).

Run it alone with ``python -m gateway.demo.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import signal
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web

COST_PER_TOKEN = Decimal("0.000002")
"""Credits per token (word) that ``X-Usage-Cost`` is computed with."""
STREAM_DELAY = 0.05
"""Seconds between streamed chat events; a request may override it with ``X-Demo-Delay``."""
MAX_DEMO_DELAY = 10.0
MODELS = ("gpt-4o-mini", "demo-small", "demo-large")
ECHO_BODY_LIMIT = 1 << 20
"""Bytes of a request body kept for the echo; larger bodies are counted and hashed only."""
REPLY_MAX_WORDS = 64
GREETING = "Hello from the keygate demo upstream."
_CHUNK = 64 * 1024


# ---------------------------------------------------------------------------- echo


@dataclass(frozen=True)
class _Body:
    size: int
    sha256: str
    kept: bytes


async def _read_body(request: web.Request, keep: int) -> _Body:
    """Consume the request body chunk by chunk, keeping at most ``keep`` bytes of it."""
    digest = hashlib.sha256()
    size = 0
    kept = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
    return _Body(size, digest.hexdigest(), bytes(kept))


def _bad_query(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _query_number(request: web.Request, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad_query(f"{name} must be a number") from None
    if not (math.isfinite(value) and 0 <= value <= high):
        raise _bad_query(f"{name} must be between 0 and {high:g}")
    return value


def _query_view(request: web.Request) -> dict[str, str | list[str]]:
    """Each query parameter's value; a list only when the parameter is repeated."""
    view: dict[str, str | list[str]] = {}
    for name in request.query:
        values = request.query.getall(name)
        view[name] = values[0] if len(values) == 1 else values
    return view


async def _echo_payload(request: web.Request) -> dict[str, Any]:
    """What arrived, for the echo; with ``?discard=1`` only the body's size and sha256."""
    if request.query.get("discard") == "1":
        body = await _read_body(request, keep=0)
        return {"body_bytes": body.size, "sha256": body.sha256}
    body = await _read_body(request, keep=ECHO_BODY_LIMIT)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return {
        "method": request.method,
        "path": request.raw_path.partition("?")[0],
        "query": _query_view(request),
        "headers": headers,
        "header_list": [[name, value] for name, value in request.headers.items()],
        "body": body.kept.decode("utf-8", errors="replace") if body.size else None,
        "body_bytes": body.size,
        "body_truncated": body.size > len(body.kept),
        "sha256": body.sha256,
    }


async def echo(request: web.Request) -> web.Response:
    """200 with what arrived; see the module docstring."""
    return web.json_response(await _echo_payload(request))


async def echo_status(request: web.Request) -> web.Response:
    """The echo, answered with the status named in the path (200-599)."""
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise _bad_query("status must be between 200 and 599")
    payload = await _echo_payload(request)
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code, **payload}, status=code)


async def echo_slow(request: web.Request) -> web.Response:
    """The echo, answered after ``?seconds=S`` (default 1, at most 30)."""
    seconds = _query_number(request, "seconds", 1.0, 30.0)
    payload = await _echo_payload(request)
    await asyncio.sleep(seconds)
    return web.json_response({"slept": seconds, **payload})


async def echo_stream(request: web.Request) -> web.StreamResponse:
    """``?chunks=N`` chunked lines ``chunk <i>\\n``, ``?interval=S`` seconds apart."""
    chunks = _query_number(request, "chunks", 5, 10_000)
    interval = _query_number(request, "interval", 0.1, 30.0)
    if chunks != int(chunks):
        raise _bad_query("chunks must be a whole number")
    await _read_body(request, keep=0)
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for i in range(int(chunks)):
            if i:
                await asyncio.sleep(interval)
            await response.write(f"chunk {i}\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left; nothing to finish
    return response


# ---------------------------------------------------------------------------- chat


class InvalidRequest(Exception):
    """A chat request OpenAI would refuse with 400 ``invalid_request_error``."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _openai_error(error: InvalidRequest) -> web.Response:
    body = {
        "error": {
            "message": str(error),
            "type": "invalid_request_error",
            "param": error.param,
            "code": error.code,
        }
    }
    return web.json_response(body, status=400)


@dataclass(frozen=True)
class Completion:
    """The planned answer to one chat request, fixed before the first byte is sent."""

    model: str
    words: tuple[str, ...]
    prompt_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool

    @property
    def completion_tokens(self) -> int:
        return len(self.words)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> str:
        """Credits as a plain decimal string (never exponent notation)."""
        return format(self.total_tokens * COST_PER_TOKEN, "f")

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


def _content_text(content: object) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"{name} must be a positive integer", name, "invalid_value")
        return value
    return None


def plan_completion(body: object) -> Completion:
    """Validate a chat request the way OpenAI would and plan its deterministic reply."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", "model", "missing_model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "'messages' must be a non-empty array", "messages", "missing_required_parameter"
        )
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("each message must be an object", "messages", "invalid_type")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise InvalidRequest("invalid stream or stream_options", "stream", "invalid_type")
    texts = [_content_text(m.get("content")) for m in messages]
    last_user = next(
        (
            t
            for m, t in zip(reversed(messages), reversed(texts), strict=True)
            if m.get("role") == "user"
        ),
        "",
    )
    words = ("Echo:", *last_user.split()) if last_user.split() else tuple(GREETING.split())
    words = words[:REPLY_MAX_WORDS]
    limit = _max_tokens(body)
    truncated = limit is not None and len(words) > limit
    return Completion(
        model=model,
        words=words[:limit] if truncated else words,
        prompt_tokens=sum(len(t.split()) for t in texts),
        finish_reason="length" if truncated else "stop",
        stream=stream,
        include_usage=options.get("include_usage") is True,
    )


def _demo_delay(request: web.Request) -> float:
    raw = request.headers.get("X-Demo-Delay")
    if raw is None:
        return STREAM_DELAY
    try:
        delay = float(raw)
    except ValueError:
        delay = -1.0
    if not (math.isfinite(delay) and 0 <= delay <= MAX_DEMO_DELAY):
        raise InvalidRequest(
            f"X-Demo-Delay must be between 0 and {MAX_DEMO_DELAY:g}", None, "invalid_value"
        )
    return delay


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: a ``chat.completion``, or SSE chunks when streaming."""
    try:
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest(
                "We could not parse the JSON body of your request.", None, "invalid_json"
            ) from None
        plan = plan_completion(body)
        delay = _demo_delay(request)
    except InvalidRequest as error:
        return _openai_error(error)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if plan.stream:
        return await _stream_completion(request, plan, completion_id, created, delay)
    result = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(plan.words)},
                "logprobs": None,
                "finish_reason": plan.finish_reason,
            }
        ],
        "usage": plan.usage(),
    }
    return web.json_response(result, headers={"X-Usage-Cost": plan.cost})


async def _stream_completion(
    request: web.Request, plan: Completion, completion_id: str, created: int, delay: float
) -> web.StreamResponse:
    """SSE: role, one event per word ``delay`` apart, finish, usage if asked, ``[DONE]``."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Usage-Cost": plan.cost,
        }
    )
    await response.prepare(request)

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": plan.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if plan.include_usage:
            event["usage"] = None
        return event

    async def send(event: dict[str, Any] | str) -> None:
        data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    try:
        await send(chunk({"role": "assistant", "content": ""}))
        for i, word in enumerate(plan.words):
            if i:
                await asyncio.sleep(delay)
            await send(chunk({"content": word if i == 0 else f" {word}"}))
        await send(chunk({}, plan.finish_reason))
        if plan.include_usage:
            await send({**chunk({}), "choices": [], "usage": plan.usage()})
        await send("[DONE]")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left mid-stream; nothing to finish
    return response


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models`` in OpenAI's list shape."""
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "keygate-demo"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


# ---------------------------------------------------------------------------- serving


def build_upstream_app() -> web.Application:
    """The sample upstream's routes; aiohttp resolves the longest literal prefix first."""
    app = web.Application()
    app.router.add_route("*", r"/echo/status/{code:\d{3}}", echo_status)
    app.router.add_route("*", "/echo/slow", echo_slow)
    app.router.add_route("*", "/echo/stream", echo_stream)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_post("/v1/chat/completions", chat_completions)
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
        description="Serve keygate's sample upstream (JSON echo + OpenAI-compatible chat).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=9000, help="port (0: any free port)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
