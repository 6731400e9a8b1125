"""Forwarding to the upstream, streaming both ways (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.errors import Outcome
from gateway.policies import ratelimit
from gateway.policies.dropped_headers import ALWAYS_REPLACED
from gateway.proxy.context import RequestContext
from gateway.proxy.headers import client_response_headers, upstream_request_headers
from gateway.proxy.paths import encode
from gateway.proxy.steps import deny
from gateway.proxy.upstream_http import Body, UpstreamClosed, UpstreamError, UpstreamUnreachable

if TYPE_CHECKING:
    from gateway.policies.cost import CostMeter
    from gateway.proxy.service import Proxy

log = logging.getLogger("keygate.proxy")
CHUNK = 65_536


_LENGTH = ("Content-Length",)


def _is_event_stream(headers: Mapping[str, str]) -> bool:
    media = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    return media == "text/event-stream"


def upstream_target(ctx: RequestContext, hide_query: str | None) -> str:
    """The path and query to send upstream (encoded), after the upstream URL's own path."""
    assert ctx.match is not None
    if hide_query is None and ctx.path_is_raw and ctx.match.upstream_path is ctx.path:
        return ctx.request.raw_path  # nothing to re-encode
    raw_query = ctx.request.raw_path.partition("?")[2]
    if hide_query is not None:
        raw_query = without_parameter(raw_query, hide_query)
    target = encode(ctx.match.upstream_path)
    return target + ("?" + raw_query if raw_query else "")


def without_parameter(raw_query: str, name: str) -> str:
    """The raw query without the pairs whose decoded name is ``name`` (as yarl and upstreams
    decode it: ``api%5Fkey`` too); every other pair is kept byte for byte, in order."""
    return "&".join(
        pair for pair in raw_query.split("&") if unquote_plus(pair.partition("=")[0]) != name
    )


def upstream_url(ctx: RequestContext, hide_query: str | None) -> URL:
    assert ctx.match is not None
    return URL(ctx.match.upstream.url + upstream_target(ctx, hide_query), encoded=True)


async def forward(proxy: Proxy, ctx: RequestContext, meter: CostMeter | None) -> web.StreamResponse:
    """Send the request upstream and stream the answer back; 502/504 problems on failure.

    ``meter`` sees the response's headers and (only if it needs them) its chunks, each
    after it was written, so metering never delays the client."""
    assert ctx.match is not None
    request = ctx.request
    headers = upstream_request_headers(
        request.headers,
        # A body read here is sent whole (perhaps rewritten): its own length, not the client's.
        drop=ctx.credential_headers if ctx.body is None else (*ctx.credential_headers, *_LENGTH),
        key=ctx.key,
        request_id_value=ctx.request_id,
        client_ip=request.remote,
        scheme=request.scheme,
    )
    upstream_settings = ctx.match.upstream
    exchange = proxy.deadlines.start(
        upstream_settings.timeouts.read, upstream_settings.timeouts.total
    )
    data: Body
    if ctx.body is not None:
        data = ctx.body
    elif request.body_exists:  # streamed, never buffered whole
        data = exchange.while_sending(request.content.iter_chunked(CHUNK))
    else:
        data = None
    hide_query = proxy.settings.keys.query_param if ctx.credential_in_query else None
    pool = proxy.pools[upstream_settings.name]
    response: web.StreamResponse | None = None
    name = upstream_settings.name
    sent_at = time.perf_counter()
    try:
        async with pool.request(
            request.method, pool.base_path + upstream_target(ctx, hide_query), headers, data
        ) as upstream:
            exchange.touch()
            ctx.upstream_status = upstream.status
            feed = None
            if meter is not None:  # before any await: a client leaving must not hide the cost
                meter.see_headers(upstream.status, upstream.headers)
                feed = meter.feed if meter.needs_body else None
            skip = ctx.policy.response_skip if ctx.policy is not None else frozenset()
            strip = None
            if ctx.llm is not None and _is_event_stream(upstream.headers):
                strip = ctx.llm.response_filter()  # the usage event the client did not ask for
                if strip is not None:
                    skip = (skip or ALWAYS_REPLACED) | {"content-length"}
            headers = client_response_headers(upstream.headers, ctx.request_id, skip)
            if ctx.decision is not None and ctx.decision.rate is not None:
                headers.extend(ratelimit.headers(ctx.decision.rate))
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            exchange.pause()
            await response.prepare(request)
            ctx.responded = True
            exchange.touch()
            async for chunk in upstream.iter_any():
                exchange.pause()
                if strip is None:
                    await response.write(chunk)  # each chunk as it comes: SSE stays live
                elif shown := strip.feed(chunk):  # every complete event at once
                    await response.write(shown)
                if feed is not None:
                    feed(chunk)  # the meter reads the upstream's bytes, usage event included
                exchange.touch()
            if strip is not None and (tail := strip.flush()):
                await response.write(tail)
            await response.write_eof()
            return response
    except asyncio.CancelledError:
        if not exchange.expired:
            ctx.outcome = Outcome.UPSTREAM_ERROR  # the client went away; upstream dropped
            raise
        exchange.task.uncancel()  # our own timeout, not the client's cancel: answer 504
        proxy.metrics.upstream_error(name, "timeout")
        if response is None:
            return deny(ctx, Outcome.UPSTREAM_TIMEOUT, "the upstream did not answer in time")
        ctx.outcome = Outcome.UPSTREAM_TIMEOUT
    except TimeoutError:  # connecting took longer than timeouts.connect
        proxy.metrics.upstream_error(name, "timeout")
        if response is None:
            return deny(ctx, Outcome.UPSTREAM_TIMEOUT, "the upstream did not answer in time")
        ctx.outcome = Outcome.UPSTREAM_TIMEOUT
    except UpstreamClosed:
        proxy.metrics.upstream_error(name, "closed")
        if response is None:  # the upstream closed or reset before answering
            return deny(ctx, Outcome.UPSTREAM_ERROR, "the upstream closed the connection")
        ctx.outcome = Outcome.UPSTREAM_ERROR  # cut off mid-body
    except UpstreamError as exc:
        kind = "connect" if isinstance(exc, UpstreamUnreachable) else "invalid"
        proxy.metrics.upstream_error(name, kind)
        if response is None:
            log.info("upstream %s failed: %s", name, exc)
            # Unreachable, or reached with an answer that is not valid HTTP (or too large).
            return deny(ctx, Outcome.UPSTREAM_ERROR, exc.detail)
        ctx.outcome = Outcome.UPSTREAM_ERROR
    except (aiohttp.ClientConnectionResetError, ConnectionResetError):
        if response is None:
            proxy.metrics.upstream_error(name, "closed")
            return deny(ctx, Outcome.UPSTREAM_ERROR, "the upstream closed the connection")
        ctx.outcome = Outcome.UPSTREAM_ERROR  # usually the client left mid-stream
    finally:
        proxy.deadlines.finish(exchange)
        ctx.upstream_s = time.perf_counter() - sent_at
    # Failed mid-stream: the status line is gone, so cut the connection rather than end the
    # body cleanly; the client must not take a truncated answer for a whole one.
    if request.transport is not None:
        request.transport.close()
    return response
