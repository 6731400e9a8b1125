"""The proxy's request chain, one step each. A step returns None to continue or the
response that ends the request; the order is written once, in gateway/app.py."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.bodies import ClientLeft, is_text, read_capped
from gateway.config.model import KeySettings, RedisSettings
from gateway.credentials import carrier_headers, extract, reads_authorization
from gateway.errors import Outcome, problem
from gateway.metrics import Metrics
from gateway.policies import ratelimit
from gateway.policies.limits import RoutePolicy
from gateway.policies.policy import Asked, Refusal
from gateway.policies.prices import PriceBook
from gateway.policies.resource import NEED_RESOURCE
from gateway.policies.routing import MethodNotAllowed, Router
from gateway.proxy.authorize import LAYOUT, Decision, KeyAuthorizer
from gateway.proxy.context import RequestContext
from gateway.proxy.expect import send_continue
from gateway.proxy.paths import BadPath, is_plain, normalize
from gateway.store.connection import STORE_ERRORS

if TYPE_CHECKING:
    from gateway.proxy.settle import Settlements

log = logging.getLogger("keygate.proxy")


class ThrottledWarning:
    """A store that is down fails every request: one log line per ``every`` seconds that
    says how many were refused, not one per request (a flood that buries the cause)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.next_at = 0.0
        self.unlogged = 0

    def refused(self, error: BaseException) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if now < self.next_at:
            return
        log.warning(
            "key store unavailable (%s): %d requests refused with 503 since the last line",
            type(error).__name__,
            self.unlogged,
        )
        self.unlogged = 0
        self.next_at = now + self.every


@dataclass(frozen=True, slots=True)
class StepSettings:
    """The slice of the settings the steps read."""

    keys: KeySettings
    redis: RedisSettings


@dataclass(frozen=True, slots=True)
class StepDeps:
    """What the steps use, one per proxy generation (gateway/proxy/service.py builds it):
    a step is ``async def step(deps: StepDeps, ctx: RequestContext) -> response | None``."""

    router: Router
    settings: StepSettings
    credentialed_upstreams: frozenset[str]  # upstreams whose URL carries credentials
    policies: Mapping[str, RoutePolicy]  # route name -> what it asks of the script
    authorizer: KeyAuthorizer
    settlements: Settlements  # a step that reserves more hands back through these
    metrics: Metrics
    store_down: ThrottledWarning  # the log line of requests refused by a store error
    prices: PriceBook  # LLM routes' model prices: the catalogue and the config's overrides


Step = Callable[[StepDeps, RequestContext], Awaitable[web.StreamResponse | None]]


def deny(ctx: RequestContext, outcome: Outcome, detail: str, **extra: Any) -> web.Response:
    ctx.outcome = outcome
    return problem(outcome, detail, error_format=ctx.error_format, **extra)


def read_path(ctx: RequestContext) -> web.Response | None:
    """Set ``ctx.path``, the one normalised path every matcher uses (GET /v1/key, the
    dialects, the routes), so no spelling of a path reaches another endpoint than its plain
    form; or refuse the target (400). A plain target costs no normalising."""
    raw = ctx.request.raw_path
    if is_plain(raw):
        ctx.path = raw.partition("?")[0]
        ctx.path_is_raw = True
        return None
    try:
        ctx.path = normalize(raw)
    except (BadPath, UnicodeDecodeError) as exc:
        return deny(ctx, Outcome.INVALID_REQUEST, f"path: {exc}")
    return None


async def match_route(deps: StepDeps, ctx: RequestContext) -> web.StreamResponse | None:
    if not ctx.path and (refused := read_path(ctx)) is not None:  # unless the proxy read it
        return refused
    found = deps.router.match(ctx.path, ctx.request.method)
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


async def take_credential(deps: StepDeps, ctx: RequestContext) -> web.StreamResponse | None:
    assert ctx.match is not None
    keys = deps.settings.keys
    request = ctx.request
    sources = ctx.match.route.sources or keys.sources
    query = request.query if "query" in sources else None
    found = extract(request.headers, query, sources, keys.query_param)
    if found.secret is None:
        return deny(ctx, found.outcome, found.detail)
    in_query = found.in_query
    if query is None and _query_may_name(request.raw_path, keys.query_param):
        # keygate's credential parameter, though no source here: an upstream may read it,
        # so it is the accepted key (hidden like one) or a second credential (400).
        values = request.query.getall(keys.query_param, ())
        if any(value != found.secret for value in values):
            detail = f"{keys.query_param}: a second API key in the query; send one"
            return deny(ctx, Outcome.INVALID_REQUEST, detail)
        in_query = bool(values)
    if (
        not reads_authorization(sources)
        and "Authorization" in request.headers
        and ctx.match.upstream.name in deps.credentialed_upstreams
    ):  # the upstream URL's credentials go in Authorization; a client's would replace them
        detail = "Authorization: this route's upstream credentials are keygate's; send none"
        return deny(ctx, Outcome.INVALID_REQUEST, detail)
    ctx.secret = found.secret
    if keys.hide_credentials:
        ctx.credential_headers = carrier_headers(sources)
        ctx.credential_in_query = in_query
    return None


def _query_may_name(raw_target: str, name: str) -> bool:
    """Whether the raw query may hold parameter ``name``, perhaps escaped; parses nothing."""
    _, mark, query = raw_target.partition("?")
    return bool(mark) and (name in query or "%" in query)


KEY_DENIALS = {  # the script's refusals of the key itself, also for GET /v1/key
    "not_found": (Outcome.INVALID_KEY, "the API key is not valid"),
    "expired": (Outcome.EXPIRED, "the API key has expired"),
    "disabled": (Outcome.DISABLED, "the API key is disabled"),
}


async def authorize_key(deps: StepDeps, ctx: RequestContext) -> web.StreamResponse | None:
    """Every check on the key, and the reservation, in one Redis script (authorize.lua,
    assembled from the policies of gateway/policies/chain.py): valid, not disabled, not
    expired, then the policies in chain order."""
    assert ctx.secret is not None and ctx.match is not None
    policy = ctx.policy = deps.policies[ctx.match.route.name]
    authorizer = deps.authorizer
    # An LLM request's own: reserve: auto's worst case, and its token estimate.
    reserve, tokens = (ctx.llm.reserve, ctx.llm.tokens) if ctx.llm is not None else (None, None)
    try:
        resource = _resource_without_body(ctx)
        if isinstance(resource, web.StreamResponse):
            return resource
        method = ctx.request.method
        decision = await authorizer.authorize(ctx.secret, policy, method, resource, reserve, tokens)
        if decision.status == NEED_RESOURCE:  # a restricted key: the body names it
            resource = await _resource_from_body(ctx)
            if isinstance(resource, web.StreamResponse):
                return resource
            decision = await authorizer.authorize(
                ctx.secret, policy, method, resource, reserve, tokens
            )
    except STORE_ERRORS as exc:
        metrics = deps.metrics
        metrics.redis_errors.labels("authorize").inc()
        if deps.settings.redis.on_error == "fail_open":
            metrics.fail_open.inc()
            return None
        deps.store_down.refused(exc)
        return deny(ctx, Outcome.STORE_ERROR, "the key store is unavailable; retry shortly")
    status = decision.status
    if status == "ok":
        ctx.key = decision.key
        ctx.decision = decision
        return None
    if decision.key is None or status in KEY_DENIALS:
        outcome, detail = KEY_DENIALS[status]
        return deny(ctx, outcome, detail)
    response = _refusal(ctx, decision, policy, resource)
    if decision.rate is not None and "RateLimit" not in response.headers:
        response.headers.extend(ratelimit.headers(decision.rate))  # as on every response
    return response


def _refusal(
    ctx: RequestContext, decision: Decision, policy: RoutePolicy, resource: str | None
) -> web.Response:
    """The answer for a known, usable key that a policy refused: the policy's own."""
    assert decision.key is not None
    refuser = LAYOUT.refusers[decision.status]
    asked = Asked(ctx.request.method, resource, decision.key.scopes, decision.now_ms)
    side = policy.sides[refuser.index]
    return respond(ctx, refuser.policy.refusal(decision.status, decision.refused, side, asked))


def respond(ctx: RequestContext, refusal: Refusal) -> web.Response:
    """A policy's refusal as the response, in the route's error format."""
    ctx.outcome = refusal.outcome
    return problem(
        refusal.outcome,
        refusal.detail,
        error_format=ctx.error_format,
        headers=refusal.headers,
        scope=refusal.scope,
        extra=refusal.extra,
    )


def _resource_without_body(ctx: RequestContext) -> str | web.Response | None:
    """The resource a request names in its query or path ("" for none); None when the
    route reads it from the body (read only if the key turns out to be restricted)."""
    assert ctx.match is not None
    rule = ctx.match.route.resource
    if rule is None or rule.json is not None:
        return None
    if rule.header is not None:
        named = ctx.request.headers.getall(rule.header, ())
        if len(named) > 1:  # upstreams disagree on which one counts: refuse to guess
            return deny(ctx, Outcome.INVALID_REQUEST, f"{rule.header}: given more than once")
        return named[0] if named else ""
    if rule.query is not None:
        values = ctx.request.query.getall(rule.query, ())
        if len(values) > 1:  # upstreams disagree on which one counts: refuse to guess
            return deny(ctx, Outcome.INVALID_REQUEST, f"{rule.query}: given more than once")
        return values[0] if values else ""
    assert rule.path_segment is not None
    segments = ctx.path.strip("/").split("/")
    return segments[rule.path_segment] if rule.path_segment < len(segments) else ""


async def _resource_from_body(ctx: RequestContext) -> str | web.Response:
    """The resource named by the JSON body ("" for none); the body is kept for forwarding."""
    assert ctx.match is not None and ctx.match.route.resource is not None
    rule = ctx.match.route.resource
    assert rule.json is not None
    await send_continue(ctx.request)  # the key is known and restricted: its body decides
    try:
        # An LLM route has read it already (gateway/proxy/llm.py).
        body = (
            ctx.body
            if ctx.body is not None
            else await read_capped(ctx.request.content, rule.max_body_bytes)
        )
    except ClientLeft:  # not a store error: nothing to count as one, nothing to let through
        return deny(ctx, Outcome.INVALID_REQUEST, "the body ended before its announced length")
    if body is None or len(body) > rule.max_body_bytes:
        return deny(
            ctx,
            Outcome.PAYLOAD_TOO_LARGE,
            f"this route reads at most {rule.max_body_bytes} bytes of body",
        )
    ctx.body = body
    resource = _json_field(body, rule.json)
    # A lone surrogate is no text any key's resources hold, nor one Redis can be sent.
    return resource if isinstance(resource, str) and is_text(resource) else ""


def _json_field(body: bytes, dotted: str) -> object:
    try:
        value: object = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the interpreter's limit
        return None
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
