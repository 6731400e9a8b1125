"""The sample upstream's Anthropic Messages API: ``POST /v1/messages``.

JSON, or with ``stream: true`` Anthropic's event sequence: ``message_start`` (the input
usage, ``output_tokens: 1``), ``content_block_start``, ``ping``, one ``content_block_delta``
``text_delta`` per word, ``content_block_stop``, ``message_delta`` (the stop reason and the
cumulative ``usage.output_tokens``), ``message_stop``. ``max_tokens`` is required; a bad
request is a 400 in Anthropic's error shape. What the answers say and count is in
``gateway.demo.llm_usage``.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from gateway.demo.llm_usage import (
    Answer,
    InvalidRequest,
    anthropic_usage,
    plan_messages,
    read_controls,
)
from gateway.demo.sse import EventStream, StreamCut


def anthropic_error(error: InvalidRequest, request_id: str) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": str(error)},
        "request_id": request_id,
    }
    return web.json_response(body, status=400, headers={"request-id": request_id})


def _message(answer: Answer, message_id: str, *, done: bool) -> dict[str, Any]:
    stop_reason = "max_tokens" if answer.truncated else "end_turn"
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": [{"type": "text", "text": answer.text}] if done else [],
        "stop_reason": stop_reason if done else None,
        "stop_sequence": None,
        "usage": anthropic_usage(answer, None if done else 1),
    }


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: a ``message``, or its event stream."""
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    try:
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest("There was an issue with the JSON body", None, "invalid") from None
        controls = read_controls(request.headers)
        answer = plan_messages(body, controls)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("stream: Input should be a valid boolean", "stream", "invalid")
    except InvalidRequest as error:
        return anthropic_error(error, request_id)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    headers = {"request-id": request_id}
    if not stream:
        return web.json_response(_message(answer, message_id, done=True), headers=headers)
    events = EventStream(request, controls)

    async def send(kind: str, fields: dict[str, Any], *, delta: bool = False) -> None:
        event = {"type": kind, **fields}
        await (events.send_delta(event, kind) if delta else events.send(event, kind))

    try:
        await events.open(headers)
        await send("message_start", {"message": _message(answer, message_id, done=False)})
        block = {"type": "text", "text": ""}
        await send("content_block_start", {"index": 0, "content_block": block})
        await send("ping", {})
        for text in answer.deltas():
            delta = {"type": "text_delta", "text": text}
            await send("content_block_delta", {"index": 0, "delta": delta}, delta=True)
        events.check_cut(last=True)
        await send("content_block_stop", {"index": 0})
        stop = _message(answer, message_id, done=True)
        await send(
            "message_delta",
            {
                "delta": {"stop_reason": stop["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": answer.output_tokens},
            },
        )
        await send("message_stop", {})
        await events.close()
    except (StreamCut, ConnectionResetError):
        pass  # cut as asked, or the client left mid-stream: nothing to finish
    return events.response
