"""The sample upstream's OpenAI Chat Completions and legacy Completions APIs.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or SSE chunks with
``stream: true``; ``stream_options.include_usage`` adds ``"usage": null`` to every chunk
and a last usage-only chunk before ``[DONE]``), and ``GET /v1/models``. What the answers say
and count is in ``gateway.demo.llm_usage``. A chat answer also states its cost in credits
up front in ``X-Usage-Cost`` (``total_tokens * COST_PER_TOKEN``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from gateway.demo.llm_usage import (
    ANTHROPIC_MODEL,
    EMBEDDING_MODEL,
    STREAM_DELAY,
    UNPRICED_MODEL,
    Answer,
    DemoControls,
    InvalidRequest,
    openai_usage,
    plan_chat,
    plan_completions,
    read_controls,
)
from gateway.demo.sse import EventStream, StreamCut

__all__ = [
    "COST_PER_TOKEN",
    "MODELS",
    "STREAM_DELAY",
    "chat_completions",
    "completions",
    "list_models",
    "openai_error",
    "read_openai_request",
]

COST_PER_TOKEN = Decimal("0.000002")
"""Credits per token (word) that ``X-Usage-Cost`` is computed with."""
MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "demo-small",
    "demo-large",
    "gpt-4o",
    ANTHROPIC_MODEL,
    EMBEDDING_MODEL,
    UNPRICED_MODEL,
)
"""What ``GET /v1/models`` lists; every API answers any model name."""

Planner = Callable[[object, DemoControls], Answer]


def openai_error(error: InvalidRequest) -> web.Response:
    body = {
        "error": {
            "message": str(error),
            "type": "invalid_request_error",
            "param": error.param,
            "code": error.code,
        }
    }
    return web.json_response(body, status=400)


async def read_openai_request(
    request: web.Request, plan: Planner
) -> tuple[dict[str, Any], Answer, DemoControls]:
    """The JSON body, its planned answer and the test controls; InvalidRequest if bad."""
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request.", None, "invalid_json"
        ) from None
    controls = read_controls(request.headers)
    return body, plan(body, controls), controls


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` as the body sets them."""
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise InvalidRequest("invalid stream or stream_options", "stream", "invalid_type")
    return stream, options.get("include_usage") is True


def _cost(answer: Answer) -> str:
    """Credits as a plain decimal string (never exponent notation)."""
    return format(answer.total_tokens * COST_PER_TOKEN, "f")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: a ``chat.completion``, or SSE chunks when streaming."""
    try:
        body, answer, controls = await read_openai_request(request, plan_chat)
        stream, include_usage = _stream_options(body)
    except InvalidRequest as error:
        return openai_error(error)
    finish = "length" if answer.truncated else "stop"
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    headers = {"X-Usage-Cost": _cost(answer)}
    if not stream:
        message = {"role": "assistant", "content": answer.text}
        result = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": answer.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": openai_usage(answer),
            "system_fingerprint": None,
        }
        return web.json_response(result, headers=headers)

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": answer.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if include_usage:
            event["usage"] = None
        return event

    events = EventStream(request, controls)
    try:
        await events.open(headers)
        await events.send(chunk({"role": "assistant", "content": ""}))
        for text in answer.deltas():
            await events.send_delta(chunk({"content": text}))
        events.check_cut(last=True)
        await events.send(chunk({}, finish))
        if include_usage:
            await events.send({**chunk({}), "choices": [], "usage": openai_usage(answer)})
        await events.send("[DONE]")
        await events.close()
    except (StreamCut, ConnectionResetError):
        pass  # cut as asked, or the client left mid-stream: nothing to finish
    return events.response


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions`` (legacy): a ``text_completion``, or SSE chunks."""
    try:
        body, answer, controls = await read_openai_request(request, plan_completions)
        stream, include_usage = _stream_options(body)
    except InvalidRequest as error:
        return openai_error(error)
    finish = "length" if answer.truncated else "stop"
    head = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": answer.model,
    }
    if not stream:
        choice = {"text": answer.text, "index": 0, "logprobs": None, "finish_reason": finish}
        return web.json_response({**head, "choices": [choice], "usage": openai_usage(answer)})

    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

    events = EventStream(request, controls)
    try:
        await events.open()
        for text in answer.deltas():
            await events.send_delta(chunk(text))
        events.check_cut(last=True)
        await events.send(chunk("", finish))
        if include_usage:
            await events.send({**head, "choices": [], "usage": openai_usage(answer)})
        await events.send("[DONE]")
        await events.close()
    except (StreamCut, ConnectionResetError):
        pass
    return events.response


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models`` in OpenAI's list shape."""
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "keygate-demo"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})
