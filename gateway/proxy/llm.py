"""An LLM route's request, read before its authorization (README, "LLM APIs").

On a route with ``cost: {llm: ...}`` the proxy reads the JSON body (capped) before the
authorize script runs, because the body decides three things the script needs or the
client must hear first: the model, whose price must exist (403 ``unpriced_model``
otherwise, unless the route allows unpriced models); the request's own worst case, which
``reserve: auto`` reserves; and for an OpenAI stream that did not ask for usage, the
rewritten body that asks for it (keygate then strips the usage event the client did not
ask for, gateway/policies/llm_request.py). The body is read only after a credential was
found, so a request without one costs no body read.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.bodies import ClientLeft, read_capped
from gateway.config.model import CostRule, LlmApi, Route
from gateway.errors import Outcome
from gateway.policies.cost import CostMeter
from gateway.policies.llm import LlmMeter
from gateway.policies.llm_request import UsageEventFilter, read_request, with_usage_requested
from gateway.policies.llm_usage import LlmRequest
from gateway.policies.prices import ModelPrice, PriceBook
from gateway.proxy.context import RequestContext
from gateway.proxy.expect import send_continue
from gateway.proxy.steps import StepDeps, deny

MAX_LLM_BODY = 4 << 20  # bytes of an LLM request body read before forwarding
# Paths whose OpenAI streams carry usage only when asked (stream_options.include_usage);
# the Responses API always ends its stream with the usage.
_ASKS_FOR_USAGE = ("/chat/completions", "/completions")


@dataclass(slots=True)
class LlmExchange:
    """What the proxy knows of an LLM request before forwarding it (``ctx.llm``)."""

    api: LlmApi
    request: LlmRequest
    price: ModelPrice | None  # None: unpriced, and the route allows it
    reserve: int | None  # micro-units this request reserves (reserve: auto), else None
    tokens: int  # its token estimate, for token limits: body bytes plus the output bound
    strip_usage: bool  # keygate asked for usage the client did not: remove it again

    def meter(self, book: PriceBook, rule: CostRule) -> CostMeter:
        """A fresh meter of this answer's cost."""
        return LlmMeter(self.api, book, rule.provider, self.request)

    def response_filter(self) -> UsageEventFilter | None:
        """What strips the usage event from the client's copy of the stream, if needed."""
        return UsageEventFilter() if self.strip_usage else None


async def read_llm_request(deps: StepDeps, ctx: RequestContext) -> web.StreamResponse | None:
    """On an LLM route: read and check the body (400 naming the field, 413, 403
    ``unpriced_model``), work out the reservation under ``reserve: auto``, and rewrite an
    OpenAI stream's body to ask for usage. Sets ``ctx.llm`` and ``ctx.body``."""
    assert ctx.match is not None
    route = ctx.match.route
    rule = route.cost
    if rule is None or rule.llm is None:
        return None
    await send_continue(ctx.request)
    try:
        body = await read_capped(ctx.request.content, MAX_LLM_BODY)
    except ClientLeft:
        return deny(ctx, Outcome.INVALID_REQUEST, "the body ended before its announced length")
    if body is None:
        return deny(
            ctx, Outcome.PAYLOAD_TOO_LARGE, f"an LLM route reads at most {MAX_LLM_BODY} bytes"
        )
    read = read_request(rule.llm, body)
    if isinstance(read, str):
        return deny(ctx, Outcome.INVALID_REQUEST, read)
    if read.model is None:
        return deny(ctx, Outcome.INVALID_REQUEST, "model: required on this route")
    price = deps.prices.price_of(read.model, rule.provider)
    if price is None and rule.unpriced == "refuse":
        return deny(
            ctx,
            Outcome.UNPRICED_MODEL,
            f"model {read.model[:200]!r} has no price, so its cost cannot be counted",
            extra={"model": read.model[:200]},
        )
    reserve: int | None = None
    if route.reserve_auto and price is not None:
        bound = _output_bound(read, route)
        if bound is None:
            return deny(
                ctx,
                Outcome.INVALID_REQUEST,
                "max_tokens: required on this route (it reserves each request's worst case)",
            )
        reserve = deps.prices.worst_case_micro(price, read.body_bytes, bound)
    strip = False
    asks = rule.llm == "openai" and read.stream and not read.usage_requested
    if asks and ctx.path.endswith(_ASKS_FOR_USAGE):
        rewritten = with_usage_requested(body)
        if rewritten is not None:
            body, strip = rewritten, True
    ctx.body = body
    # Token limits reserve the input's bound (a token is at least a byte of the body) plus
    # the output bound when one is known; the settlement trues it up to the usage.
    tokens = read.body_bytes + (_output_bound(read, route) or 0)
    ctx.llm = LlmExchange(rule.llm, read, price, reserve, tokens, strip)
    return None


def _output_bound(read: LlmRequest, route: Route) -> int | None:
    """The most output tokens this request can produce: its own bound, else the route's."""
    if read.max_output_tokens is not None:
        return read.max_output_tokens
    return route.max_output_tokens
