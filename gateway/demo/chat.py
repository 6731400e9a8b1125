"""The sample upstream's OpenAI-compatible chat API.

``POST /v1/chat/completions`` (JSON or SSE with ``stream: true``) and ``GET /v1/models``.
The reply echoes the last user message; tokens are words; the cost in credits is sent up
front in ``X-Usage-Cost`` (``total_tokens * COST_PER_TOKEN``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
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
REPLY_MAX_WORDS = 64
GREETING = "Hello from the keygate demo upstream."


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
