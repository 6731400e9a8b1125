"""The proxy's request chain, one step each. A step returns None to continue or the
response that ends the request; the order is written once, in gateway/app.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway.credentials import extract
from gateway.errors import Outcome, problem
from gateway.policies.scopes import missing
from gateway.proxy.context import RequestContext
from gateway.proxy.paths import BadPath, is_plain, normalize
from gateway.proxy.routing import MethodNotAllowed

if TYPE_CHECKING:
    from gateway.proxy.service import Proxy

log = logging.getLogger("keygate.proxy")
Step = Callable[["Proxy", RequestContext], Awaitable[web.StreamResponse | None]]


def deny(ctx: RequestContext, outcome: Outcome, detail: str, **extra: Any) -> web.Response:
    ctx.outcome = outcome
    return problem(outcome, detail, error_format=ctx.error_format, **extra)


async def match_route(proxy: Proxy, ctx: RequestContext) -> web.StreamResponse | None:
    raw = ctx.request.raw_path
    if is_plain(raw):
        ctx.path = raw.partition("?")[0]
        ctx.path_is_raw = True
    else:
        try:
            ctx.path = normalize(raw)
        except (BadPath, UnicodeDecodeError) as exc:
            return deny(ctx, Outcome.INVALID_REQUEST, f"path: {exc}")
    found = proxy.router.match(ctx.path, ctx.request.method)
    if found is None:
        return deny(ctx, Outcome.NOT_FOUND, "no route serves this path")
    if isinstance(found, MethodNotAllowed):
        return deny(
            ctx,
            Outcome.METHOD_NOT_ALLOWED,
            f"this route takes {', '.join(found.allowed)}",
            headers={"Allow": ", ".join(found.allowed)},
        )
    ctx.match = found
    return None


async def take_credential(proxy: Proxy, ctx: RequestContext) -> web.StreamResponse | None:
    assert ctx.match is not None
    keys = proxy.settings.keys
    sources = ctx.match.route.sources or keys.sources
    query = ctx.request.query if "query" in sources else None
    found = extract(ctx.request.headers, query, sources, keys.query_param)
    if found.secret is None:
        return deny(ctx, found.outcome, found.detail)
    ctx.secret = found.secret
    if keys.hide_credentials:
        ctx.credential_headers = found.headers
        ctx.credential_in_query = found.in_query
    return None


_DENIALS = {
    "not_found": (Outcome.INVALID_KEY, "the API key is not valid"),
    "expired": (Outcome.EXPIRED, "the API key has expired"),
    "disabled": (Outcome.DISABLED, "the API key is disabled"),
}


async def authorize_key(proxy: Proxy, ctx: RequestContext) -> web.StreamResponse | None:
    assert ctx.secret is not None
    try:
        decision = await proxy.authorizer.authorize(ctx.secret)
    except (RedisError, OSError) as exc:
        if proxy.settings.redis.on_error == "fail_open":
            proxy.stats.failed_open += 1
            return None
        log.warning("key store unavailable: %s", type(exc).__name__)
        return deny(ctx, Outcome.STORE_ERROR, "the key store is unavailable; retry shortly")
    if decision.key is None or decision.status != "ok":
        outcome, detail = _DENIALS[decision.status]
        return deny(ctx, outcome, detail)
    ctx.key = decision.key
    return None


async def check_scopes(proxy: Proxy, ctx: RequestContext) -> web.StreamResponse | None:
    assert ctx.match is not None
    if ctx.key is None:  # let through on a store error (fail_open): nothing to check
        return None
    scopes = ctx.match.route.scopes
    needed = scopes.get(ctx.request.method)
    if needed is None:  # an empty list for a method means "no scope", not "the default"
        needed = scopes.get("*", ())
    lacking = missing(ctx.key.scopes, needed)
    if lacking:
        return deny(
            ctx,
            Outcome.FORBIDDEN_SCOPE,
            f"this route needs the {' '.join(lacking)} scope",
            scope=" ".join(needed),
        )
    return None


async def check_resource(proxy: Proxy, ctx: RequestContext) -> web.StreamResponse | None:
    assert ctx.match is not None
    rule = ctx.match.route.resource
    if rule is None or ctx.key is None or ctx.key.resources is None:
        return None  # an unrestricted key: the body is not read at all
    resource: object = None
    if rule.query is not None:
        values = ctx.request.query.getall(rule.query, ())
        if len(values) > 1:  # upstreams disagree on which one counts: refuse to guess
            return deny(ctx, Outcome.INVALID_REQUEST, f"{rule.query}: given more than once")
        resource = values[0] if values else None
    elif rule.path_segment is not None:
        segments = ctx.path.strip("/").split("/")
        resource = segments[rule.path_segment] if rule.path_segment < len(segments) else None
    elif rule.json is not None:
        body = await ctx.request.content.read(rule.max_body_bytes + 1)
        while len(body) <= rule.max_body_bytes and (
            more := await ctx.request.content.read(rule.max_body_bytes + 1 - len(body))
        ):
            body += more
        if len(body) > rule.max_body_bytes:
            return deny(
                ctx,
                Outcome.PAYLOAD_TOO_LARGE,
                f"this route reads at most {rule.max_body_bytes} bytes of body",
            )
        ctx.body = body
        resource = _json_field(body, rule.json)
    if not isinstance(resource, str):
        return deny(
            ctx,
            Outcome.FORBIDDEN_RESOURCE,
            "this key is limited to listed resources and the request names none",
        )
    if resource not in ctx.key.resources:
        return deny(ctx, Outcome.FORBIDDEN_RESOURCE, f"this key may not use {resource[:200]!r}")
    return None


def _json_field(body: bytes, dotted: str) -> object:
    try:
        value: object = json.loads(body)
    except ValueError:
        return None
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
