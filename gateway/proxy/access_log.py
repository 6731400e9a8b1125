"""The access log: one line per proxied request on stdout, JSON or human text.

It runs on every request, so it stays off the logging module and off the kernel: ``record``
formats one line into a list, and every line of one event-loop turn leaves in ONE write at
the end of the turn (the batching gateway/store/multiplex.py does for Redis commands).

What a line never holds: a secret. Headers are not logged at all; the path is logged
without its query, and the query apart with the key parameter's value (``keys.query_param``)
replaced by ``[redacted]``, however the client spelled the parameter's name.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import BinaryIO, Literal
from urllib.parse import unquote_plus

from gateway.config.model import Settings
from gateway.metrics import NO_ROUTE
from gateway.proxy.context import RequestContext

log = logging.getLogger("keygate")

AccessFormat = Literal["json", "text"]
REDACTED = "[redacted]"
# Text lines go to a terminal: control characters and spaces would forge or split a line.
_TEXT_ESCAPES = {c: f"%{c:02X}" for c in (*range(0x21), 0x7F)}


class AccessLog:
    """Buffers one line per request; writes the turn's lines with one write to ``stream``."""

    def __init__(self, stream: BinaryIO, *, fmt: AccessFormat, query_param: str) -> None:
        self.stream = stream
        self.format: AccessFormat = fmt
        self.query_param = query_param
        self._lines: list[str] = []
        self._scheduled = False
        self._broken = False
        self._second = -1
        self._second_text = ""
        self._ts = ""

    @classmethod
    def from_settings(cls, settings: Settings, stream: BinaryIO | None = None) -> AccessLog | None:
        """The configured access log on ``stream`` (stdout by default); None when
        ``log.access`` is off. ``auto`` is text on a terminal, JSON otherwise."""
        if not settings.log.access:
            return None
        out = stream if stream is not None else sys.stdout.buffer
        fmt = settings.log.access_format
        if fmt == "auto":
            fmt = "text" if out.isatty() else "json"
        return cls(out, fmt=fmt, query_param=settings.keys.query_param)

    def record(
        self,
        ctx: RequestContext,
        status: int,
        total_s: float,
        upstream_s: float | None,
        cost_micro: int | None,
    ) -> None:
        """Queue the line for ``ctx``'s request; it is written at the end of this turn.

        ``total_s``: seconds from the request's arrival to its response; ``upstream_s``:
        seconds spent on the upstream (None when none was called); ``cost_micro``: what
        the request was charged, in micro-units (None when nothing was settled)."""
        if self._broken:
            return
        if not self._scheduled:  # the first line of this turn: one clock read per turn
            self._scheduled = True
            self._ts = self._now()
            asyncio.get_running_loop().call_soon(self.flush)
        request = ctx.request
        path, _, query = request.raw_path.partition("?")
        if query:
            query = self._redact(query)
        # The matched route, or keygate's own endpoint (dialect:<name>, own_key, metrics),
        # as the metrics label it; null when nothing answered the path.
        if ctx.match is not None:
            route: str | None = ctx.match.route.name
        else:
            route = ctx.endpoint if ctx.endpoint != NO_ROUTE else None
        key = ctx.key
        # Integer arithmetic: formatting floats costs several times more per line.
        cost = None if cost_micro is None else _decimal(cost_micro, 1_000_000, "06d")
        upstream_ms = None if upstream_s is None else _decimal(int(upstream_s * 1e6), 1000, "03d")
        total_ms = _decimal(int(total_s * 1e6), 1000, "03d")
        if self.format == "json":
            line = (
                f'{{"ts":"{self._ts}","request_id":{_quote(ctx.request_id)},'
                f'"route":{_json_text(route)},"method":{_quote(request.method)},'
                f'"path":{_quote(path)},"query":{_quote(query) if query else "null"},'
                f'"status":{status},"outcome":"{ctx.outcome.value}",'
                f'"key_id":{_json_text(key.id if key else None)},'
                f'"workspace":{_json_text(key.workspace_id if key else None)},'
                f'"cost":{cost or "null"},"upstream_ms":{upstream_ms or "null"},'
                f'"total_ms":{total_ms}{_json_tokens(ctx)}}}\n'
            )
        else:
            target = path + "?" + query if query else path
            line = (
                f"{self._ts} {status} {ctx.outcome.value} {_plain(request.method)} "
                f"{_plain(target)} route={_plain(route)} key={_plain(key.id if key else None)} "
                f"workspace={_plain(key.workspace_id if key else None)} "
                f"cost={_plain(cost)} upstream_ms={_plain(upstream_ms)} "
                f"total_ms={total_ms} request_id={_plain(ctx.request_id)}{_text_tokens(ctx)}\n"
            )
        self._lines.append(line)

    def flush(self) -> None:
        """Write every queued line now, in one write."""
        self._scheduled = False
        if not self._lines or self._broken:
            self._lines.clear()
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # stdout closed or its reader gone
            self._broken = True
            log.warning("access log stopped: cannot write to its stream (%s)", type(exc).__name__)

    def close(self) -> None:
        """Write what is queued; call once the listeners have stopped."""
        self.flush()

    def _now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def _redact(self, query: str) -> str:
        """The raw query with every value of the key parameter replaced; the other
        parameters stay as the client sent them. Names are compared decoded (as yarl
        reads them for the proxy), so ``api%5Fkey=`` is caught too."""
        name = self.query_param
        if name not in query and "%" not in query and "+" not in query:
            return query
        parts = query.split("&")
        for i, part in enumerate(parts):
            raw_name, has_value, _ = part.partition("=")
            decoded = unquote_plus(raw_name) if "%" in raw_name or "+" in raw_name else raw_name
            if decoded == name:
                parts[i] = f"{raw_name}={REDACTED}" if has_value else raw_name
        return "&".join(parts)


def _json_tokens(ctx: RequestContext) -> str:
    """An LLM answer's members of a JSON line ("" for any other request): its model,
    tokens, and whether they were estimated from a cut stream's text."""
    usage = ctx.usage
    if usage is None:
        return ""
    return (
        f',"model":{_quote(usage.model)},"input_tokens":{usage.input},'
        f'"output_tokens":{usage.output},"estimated":{"true" if usage.estimated else "false"}'
    )


def _text_tokens(ctx: RequestContext) -> str:
    usage = ctx.usage
    if usage is None:
        return ""
    estimated = " estimated" if usage.estimated else ""
    return (
        f" model={_plain(usage.model)} input_tokens={usage.input} "
        f"output_tokens={usage.output}{estimated}"
    )


def _json_text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def _decimal(value: int, unit: int, fraction: str) -> str:
    """``value / unit`` as an exact decimal: 1234, 1000 -> "1.234" (a valid JSON number)."""
    whole, part = divmod(value, unit)
    return f"{whole}.{part:{fraction}}"


def _plain(value: object) -> str:
    return "-" if value is None else str(value).translate(_TEXT_ESCAPES)
