"""The proxy listener's handler: run the chain, then forward."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.config.model import Settings, Upstream
from gateway.dialects import mount as dialects
from gateway.dialects.mount import DialectRouter, registry
from gateway.errors import Outcome
from gateway.listener import unanswered_status
from gateway.metrics import OTHER, OWN_KEY, Metrics
from gateway.policies import ratelimit
from gateway.policies.cost import CostMeter
from gateway.policies.limits import RoutePolicy
from gateway.policies.llm_usage import TokenUsage
from gateway.policies.prices import PriceBook
from gateway.policies.routing import Router
from gateway.proxy.access_log import AccessLog
from gateway.proxy.authorize import KeyAuthorizer
from gateway.proxy.context import RequestContext
from gateway.proxy.deadlines import Deadlines
from gateway.proxy.expect import close_if_body_withheld, send_continue
from gateway.proxy.forward import forward
from gateway.proxy.headers import REQUEST_ID, request_id
from gateway.proxy.metrics_endpoint import metrics_on_proxy
from gateway.proxy.own_key import is_own_key_request, own_key
from gateway.proxy.settle import Settlements
from gateway.proxy.steps import Step, StepDeps, StepSettings, ThrottledWarning, read_path
from gateway.proxy.upstream_http import UpstreamPool
from gateway.proxy.websocket import is_upgrade, proxy_websocket
from gateway.store.connection import STORE_ERRORS
from gateway.store.keystore import KeyStore

log = logging.getLogger("keygate.proxy")
KEY_COUNT_INTERVAL = 60.0  # seconds between counts of keys per workspace (keygate_keys)


_NOTHING_AUTOMATIC: CIMultiDict[None] = CIMultiDict(
    (name, None) for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
)


class ForwardedRequest(aiohttp.ClientRequest):
    """An upstream request that carries the client's headers and invents none.

    aiohttp adds Accept, Accept-Encoding, User-Agent and (to bodies) Content-Type to the
    requests it makes, and building the list of headers to skip costs a multidict copy per
    request; a proxy wants neither.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NOTHING_AUTOMATIC


def upstream_session(upstream: Upstream) -> aiohttp.ClientSession:
    """One long-lived keep-alive pool per upstream, sized by its pool_size."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=upstream.pool_size, limit_per_host=upstream.pool_size),
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        auto_decompress=False,  # bytes pass through as the upstream encoded them
        request_class=ForwardedRequest,
        # Only the connect timeout is aiohttp's; idle-read and total are gateway/proxy/
        # deadlines.py's, far cheaper per request than aiohttp's per-packet timers.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=upstream.timeouts.connect),
    )


class Proxy:
    """One generation of the proxy: the routes, upstream pools, policies and dialects of one
    config. A reload builds a ``successor`` that shares everything process-wide (the key
    authorizer, metrics, settlements, deadlines, access log, key store) and ``retire``s
    this one once its requests have finished."""

    def __init__(
        self,
        settings: Settings,
        authorizer: KeyAuthorizer,
        chain: Sequence[Step],
        store: KeyStore | None = None,
        *,
        follows: Proxy | None = None,
    ) -> None:
        self.settings = settings
        self.router = Router(settings.routes, settings.upstreams)
        # The listing dialects (docs/dialects.md) need the key store; without one none is mounted.
        self.store = store
        self.metrics: Metrics = (
            follows.metrics
            if follows is not None
            else Metrics(per_key=settings.metrics.per_key, per_key_max=settings.metrics.per_key_max)
        )
        specs = registry() if store is not None else {}
        if store is not None and settings.metrics.on_proxy:
            specs["metrics"] = metrics_on_proxy(self.metrics)
        self.dialects = DialectRouter(settings, specs)
        for taken in self.dialects.shadowed(self.router):
            log.warning("a listing dialect serves %s; the route does not get it", taken)
        self.policies = {route.name: RoutePolicy.of(route) for route in settings.routes}
        self.authorizer = authorizer
        self.chain = tuple(chain)
        self.sessions: dict[str, aiohttp.ClientSession] = {}  # WebSocket routes
        self.pools = {
            name: UpstreamPool(
                u.url,
                u.pool_size,
                u.timeouts.connect,
                max_head_bytes=u.max_response_head_bytes,
                max_header_fields=u.max_response_headers,
            )
            for name, u in settings.upstreams.items()
        }
        self._counting: asyncio.Task[None] | None = None
        self._closing = False
        self._handling = 0  # requests in this generation's handle()
        self._drained: asyncio.Event | None = None  # made by retire(), set at _handling 0
        self.deadlines: Deadlines
        self.settlements: Settlements
        self.access_log: AccessLog | None
        self.store_down: ThrottledWarning  # the log line of requests refused by a store error
        if follows is not None:
            self.store_down = follows.store_down
            self.deadlines = follows.deadlines
            self.settlements = follows.settlements
            self.access_log = follows.access_log
        else:
            self.store_down = ThrottledWarning()
            self.deadlines = Deadlines()
            self.settlements = Settlements(authorizer, self.metrics)
            authorizer.abandoned = self.settlements.release
            authorizer.timed = self.metrics.authorize_duration.observe
            authorizer.redis.on_unreplicated = self.metrics.redis_unreplicated.inc
            self.access_log = AccessLog.from_settings(settings)  # None when switched off
        # What the chain's steps use of this generation (not the whole proxy).
        self.deps = StepDeps(
            router=self.router,
            settings=StepSettings(keys=settings.keys, redis=settings.redis),
            credentialed_upstreams=frozenset(
                name for name, pool in self.pools.items() if pool.credentials
            ),
            policies=self.policies,
            authorizer=authorizer,
            settlements=self.settlements,
            metrics=self.metrics,
            store_down=self.store_down,
            prices=PriceBook(settings.prices),
        )

    def successor(self, settings: Settings) -> Proxy:
        """The next generation, for ``settings`` (already reduced to what a reload may
        change: gateway/config/reloadable.py). Call ``start_sessions`` before serving it."""
        successor = Proxy(settings, self.authorizer, self.chain, self.store, follows=self)
        # The key count runs once per process: it moves to the generation that will close.
        successor._counting, self._counting = self._counting, None
        return successor

    def start_sessions(self) -> None:
        self.sessions = {name: upstream_session(u) for name, u in self.settings.upstreams.items()}

    async def retire(self) -> None:
        """Close this generation's upstream pools once its last request has finished, or
        after ``shutdown_timeout`` (the bound a stop gives requests, too)."""
        self._drained = asyncio.Event()
        if self._handling:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    await self._drained.wait()
        await self._close_pools()

    async def _close_pools(self) -> None:
        for session in self.sessions.values():
            await session.close()
        for pool in self.pools.values():
            await pool.close()

    async def start(self) -> None:
        self.start_sessions()
        if self.store is not None:
            self._counting = asyncio.create_task(self._count_keys())

    async def refresh_key_counts(self) -> None:
        """Count keys per workspace for keygate_keys (one SCAN and a pipeline of ZCARD)."""
        assert self.store is not None
        self.metrics.set_key_counts(await self.store.counts_by_workspace())

    async def _count_keys(self) -> None:
        """In the background, never per scrape: a scrape must stay cheap however many keys."""
        while not self._closing:
            try:
                await self.refresh_key_counts()
            except STORE_ERRORS as exc:
                if self._closing:
                    return
                log.warning("counting keys per workspace failed: %s", type(exc).__name__)
            await asyncio.sleep(KEY_COUNT_INTERVAL)

    async def close(self) -> None:
        """Close the upstream pools once every settlement in flight is written, refunds of
        authorizations whose clients left included."""
        if self._counting is not None:
            self._counting.cancel()
            # Bounded: a cancellation that lands in redis-py's connect can come out as a
            # TimeoutError (an OSError), which the loop survives; the loop then sees
            # `_closing` and ends, but never wait on it for long.
            self._closing = True
            await asyncio.wait([self._counting], timeout=1.0)
        with contextlib.suppress(TimeoutError):  # a reply is overdue: its connection fails
            async with asyncio.timeout(self.settings.redis.socket_timeout):
                await self.authorizer.redis.late_replies_handled()
        await self.settlements.drain()
        await self._close_pools()
        if self.access_log is not None:
            self.access_log.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        ctx = RequestContext(request, request_id(request.headers.get(REQUEST_ID)))
        metrics = self.metrics
        metrics.in_flight.inc()
        self._handling += 1
        response: web.StreamResponse | None = None
        try:
            response = await self._respond(ctx)
            close_if_body_withheld(request, response)  # refused before asking for the body
            return response
        finally:
            metrics.in_flight.dec()
            self._handling -= 1
            if not self._handling and self._drained is not None:
                self._drained.set()
            # No response: the client left first (nginx's 499), or its upload stalled (408).
            status = response.status if response is not None else unanswered_status(request)
            if status == 408:
                ctx.outcome = Outcome.INVALID_REQUEST
            route = ctx.match.route.name if ctx.match is not None else ctx.endpoint
            total = time.perf_counter() - started
            metrics.request(route, request.method, status, ctx.outcome.value, total, ctx.upstream_s)
            if metrics.per_key and ctx.key is not None:
                metrics.key_used(ctx.key.id, ctx.key.name, ctx.charged)
            if self.access_log is not None:
                cost = ctx.charged if ctx.decision is not None else None
                self.access_log.record(ctx, status, total, ctx.upstream_s, cost)

    async def _respond(self, ctx: RequestContext) -> web.StreamResponse:
        request = ctx.request
        if (refused := read_path(ctx)) is not None:  # the one path every matcher below uses
            refused.headers[REQUEST_ID] = ctx.request_id
            return refused
        if is_own_key_request(request.method, ctx.path):
            ctx.endpoint = OWN_KEY
            answer = await own_key(self, request, ctx.request_id)
            ctx.outcome = outcome_of(answer.status)
            return answer
        if self.dialects and (found := self.dialects.match(ctx.path)) is not None:
            assert self.store is not None
            ctx.endpoint = found[0].route_label or f"dialect:{found[0].name}"
            answer = await dialects.serve(found, request, self.store, self.settings)
            answer.headers[REQUEST_ID] = ctx.request_id
            ctx.outcome = outcome_of(answer.status)
            return answer
        deps = self.deps
        for step in self.chain:
            response = await step(deps, ctx)
            if response is not None:
                response.headers[REQUEST_ID] = ctx.request_id
                return response
        decision = ctx.decision  # None when let through on a store error (fail_open)
        meter = None if decision is None or ctx.policy is None else self._meter(ctx)
        try:
            # Authorised: a client holding its body back sends it. Inside the try: a client
            # that leaves here still has its reservation settled (refunded), not leased.
            await send_continue(request)
            if ctx.match is not None and ctx.match.route.websocket and is_upgrade(request):
                response = await proxy_websocket(self, ctx, meter)
            else:
                response = await forward(self, ctx, meter)
        finally:
            if decision is not None:  # also when the client left
                ctx.charged = self.settlements.settle(ctx, decision, meter)
                if meter is not None and meter.usage is not None:
                    ctx.usage = meter.usage
                    self._count_tokens(ctx, meter.usage)
        if not response.prepared:  # a 502/504 problem; streamed answers carry these already
            response.headers[REQUEST_ID] = ctx.request_id
            if decision is not None and decision.rate is not None:
                response.headers.extend(ratelimit.headers(decision.rate))
        return response

    def _meter(self, ctx: RequestContext) -> CostMeter | None:
        """A fresh meter of this request's cost (an LLM route's reads its request)."""
        assert ctx.policy is not None
        if ctx.llm is not None and ctx.match is not None and ctx.match.route.cost is not None:
            return ctx.llm.meter(self.deps.prices, ctx.match.route.cost)
        return ctx.policy.meter()

    def _count_tokens(self, ctx: RequestContext, usage: TokenUsage) -> None:
        """keygate_tokens_total; the model label is bounded by the priced models."""
        assert ctx.match is not None
        rule = ctx.match.route.cost
        priced = rule is not None and self.deps.prices.price_of(usage.model, rule.provider)
        self.metrics.tokens_used(
            ctx.match.route.name,
            usage.model if priced else OTHER,
            {
                "input": usage.input,
                "output": usage.output,
                "cache_read": usage.cache_read,
                "cache_write": usage.cache_write,
                "reasoning": usage.reasoning,
            },
        )


_OUTCOME_OF_STATUS = {
    401: Outcome.INVALID_KEY,
    403: Outcome.FORBIDDEN_SCOPE,
    503: Outcome.STORE_ERROR,
}


def outcome_of(status: int) -> Outcome:
    """The outcome of an answer keygate made itself (a dialect's, GET /v1/key), for metrics
    and the access log: those answers carry their outcome only as a status."""
    if status < 400:
        return Outcome.OK
    return _OUTCOME_OF_STATUS.get(status, Outcome.INVALID_REQUEST)
