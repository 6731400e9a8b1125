"""The sample upstream's OpenAI Responses API: ``POST /v1/responses``.

JSON, or with ``stream: true`` the Responses event stream (``response.created``,
``response.in_progress``, output item and content part events, one
``response.output_text.delta`` per word, then ``response.completed``, or
``response.incomplete`` when ``max_output_tokens`` cut the answer, carrying the usage).
What the answers say and count is in ``gateway.demo.llm_usage``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from gateway.demo.chat import openai_error, read_openai_request
from gateway.demo.llm_usage import Answer, InvalidRequest, plan_responses, responses_usage
from gateway.demo.sse import EventStream, StreamCut


class _Response:
    """The ``response`` object of one answer, in progress or finished."""

    def __init__(self, answer: Answer, body: dict[str, Any]) -> None:
        self.answer = answer
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"

    @property
    def status(self) -> str:
        return "incomplete" if self.answer.truncated else "completed"

    def reasoning_item(self) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": []}

    def text_part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message_item(self, *, done: bool) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "status": self.status if done else "in_progress",
            "role": "assistant",
            "content": [self.text_part(self.answer.text)] if done else [],
        }

    def output(self) -> list[dict[str, Any]]:
        items = [self.reasoning_item()] if self.answer.reasoning_tokens else []
        if self.answer.words:
            items.append(self.message_item(done=True))
        return items

    def render(self, *, done: bool) -> dict[str, Any]:
        incomplete = done and self.answer.truncated
        instructions = self.body.get("instructions")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status if done else "in_progress",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": self.body.get("max_output_tokens"),
            "model": self.answer.model,
            "output": self.output() if done else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": responses_usage(self.answer) if done else None,
            "user": None,
            "metadata": {},
        }


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: a ``response`` object, or its event stream."""
    try:
        body, answer, controls = await read_openai_request(request, plan_responses)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean", "stream", "invalid_type")
    except InvalidRequest as error:
        return openai_error(error)
    response = _Response(answer, body)
    if not stream:
        return web.json_response(response.render(done=True))
    events = EventStream(request, controls)
    sequence = 0

    async def send(kind: str, fields: dict[str, Any], *, delta: bool = False) -> None:
        nonlocal sequence
        event = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        await (events.send_delta(event, kind) if delta else events.send(event, kind))

    message = {"item_id": response.message_id, "output_index": 0, "content_index": 0}
    try:
        await events.open()
        await send("response.created", {"response": response.render(done=False)})
        await send("response.in_progress", {"response": response.render(done=False)})
        if answer.reasoning_tokens:
            item = response.reasoning_item()
            await send("response.output_item.added", {"output_index": 0, "item": item})
            await send("response.output_item.done", {"output_index": 0, "item": item})
            message["output_index"] = 1
        if answer.words:
            index = message["output_index"]
            opened = response.message_item(done=False)
            await send("response.output_item.added", {"output_index": index, "item": opened})
            await send("response.content_part.added", {**message, "part": response.text_part("")})
            for text in answer.deltas():
                await send(
                    "response.output_text.delta",
                    {**message, "delta": text, "logprobs": []},
                    delta=True,
                )
            events.check_cut(last=True)
            await send(
                "response.output_text.done", {**message, "text": answer.text, "logprobs": []}
            )
            part = response.text_part(answer.text)
            await send("response.content_part.done", {**message, "part": part})
            done = response.message_item(done=True)
            await send("response.output_item.done", {"output_index": index, "item": done})
        events.check_cut(last=True)
        await send(f"response.{response.status}", {"response": response.render(done=True)})
        await events.close()
    except (StreamCut, ConnectionResetError):
        pass  # cut as asked, or the client left mid-stream: nothing to finish
    return events.response
