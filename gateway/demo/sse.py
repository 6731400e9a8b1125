"""Server-sent events for the sample upstream's LLM streams, with the test controls every
stream shares: a delay between text deltas and a cut after N of them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.demo.llm_usage import DemoControls


class StreamCut(Exception):
    """The stream was cut as ``X-Demo-Cut-After`` asked; nothing more may be sent."""


class EventStream:
    """One SSE response: ``send`` writes an event, ``send_delta`` a text delta (paced by
    ``controls.delay`` and cut after ``controls.cut_after`` of them)."""

    def __init__(self, request: web.Request, controls: DemoControls) -> None:
        self._request = request
        self._controls = controls
        self._deltas = 0
        self.response = web.StreamResponse()

    async def open(self, headers: Mapping[str, str] | None = None) -> None:
        self.response.headers.update(
            {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **(headers or {})}
        )
        await self.response.prepare(self._request)

    async def send(self, data: Mapping[str, Any] | str, event: str | None = None) -> None:
        payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        head = f"event: {event}\n" if event else ""
        await self.response.write(f"{head}data: {payload}\n\n".encode())

    async def send_delta(self, data: Mapping[str, Any], event: str | None = None) -> None:
        """A text delta: the first goes at once, later ones ``delay`` apart."""
        self.check_cut()
        if self._deltas:
            await asyncio.sleep(self._controls.delay)
        await self.send(data, event)
        self._deltas += 1

    def check_cut(self, *, last: bool = False) -> None:
        """Cut here if the test asked for no more deltas (``last``: the text is over, so
        any cut asked for happens now): the bytes already written are flushed, then the
        connection closes without a terminating chunk."""
        limit = self._controls.cut_after
        if limit is not None and (last or self._deltas >= limit):
            transport = self._request.transport
            if transport is not None:
                transport.close()
            raise StreamCut

    async def close(self) -> None:
        await self.response.write_eof()
