"""The auth listener (``auth_listen``): keygate as the decision point of a proxy a team
already runs (README, "Already run nginx, Traefik, Caddy or Envoy?").

A check request names an original request (gateway/forward_auth/original.py); keygate
runs the proxy's own chain on it (route, credential, the one authorize call, the
workspace budget), with the same settings, Redis client and settlements as the proxy
listener, then answers the caller's contract:

- allowed: 200 with ``X-Keygate-Key-Id``, ``X-Keygate-Workspace-Id``,
  ``X-Keygate-Scopes``, ``X-Keygate-Request-Id`` (its ledger entry, for ``POST
  /v1/usage``) and the rate-limit fields, for the proxy to pass upstream;
- refused: Traefik, Caddy and Envoy relay keygate's answer as it is (status, headers,
  body); nginx turns anything but 2xx, 401 and 403 into a 500, so there every refusal but
  a 401 is a 403 carrying ``X-Keygate-Status`` (the real status) and
  ``X-Keygate-Deny-Reason`` (its code).

What a request costs is settled without seeing the response: a fixed cost (and a route
that charges nothing) at once, at the route's price; any other cost rule leaves the
reservation for ``POST /v1/usage`` (gateway/forward_auth/report.py), or for its lease end
(``reservations.on_expiry``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.errors import Outcome, problem
from gateway.forward_auth.original import Caller, caller_of, original_request
from gateway.forward_auth.report import report_usage, verify_key
from gateway.policies import ratelimit
from gateway.proxy.context import RequestContext
from gateway.proxy.headers import REQUEST_ID, request_id
from gateway.proxy.service import Proxy

# Headers of a refusal nginx passes to its client when its config copies them.
_STATUS = "X-Keygate-Status"
_REASON = "X-Keygate-Deny-Reason"


class Allowed:
    """A check's 200: only headers, no body. Lighter than an aiohttp ``Response`` (no
    multidict, no cookie jar), which the auth listener would only take apart again to
    write it (gateway/forward_auth/wire.py)."""

    __slots__ = ("headers",)
    status = 200
    reason = "OK"

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


Answer = web.StreamResponse | Allowed


class Incoming(Protocol):
    """A request as the auth listener parsed it (gateway/forward_auth/wire.py)."""

    method: str
    raw_path: str  # the request target, as sent
    headers: CIMultiDictProxy[str]

    def as_aiohttp(self, method: str, target: str) -> web.BaseRequest:
        """This request as aiohttp's ``BaseRequest`` with ``method`` and ``target``, which
        the proxy's chain reads: a check becomes the original request it names, with the
        check's headers. Raises ValueError for a target that is no URL."""


def request_token(key_id: str, entry: str, workspace_id: str | None) -> str:
    """``X-Keygate-Request-Id``: what ``POST /v1/usage`` needs to find the reservation
    (the key, its ledger entry, and the workspace whose budget also holds it)."""
    token = f"{key_id}.{entry}"
    return f"{token}.{workspace_id}" if workspace_id is not None else token


class ForwardAuth:
    """The auth listener's handler; ``current`` is the serving proxy generation."""

    def __init__(self, current: Callable[[], Proxy]) -> None:
        self.current = current

    async def handle(self, request: Incoming) -> Answer:
        proxy = self.current()
        raw = request.raw_path
        if raw in ("/v1/usage", "/v1/verify"):
            if request.method != "POST":
                return problem(
                    Outcome.METHOD_NOT_ALLOWED,
                    "this endpoint takes POST",
                    headers={"Allow": "POST"},
                )
            as_sent = request.as_aiohttp(request.method, raw)
            if raw == "/v1/usage":
                return await report_usage(proxy, as_sent)
            return await verify_key(proxy, as_sent)
        caller = caller_of(raw)
        if caller is None:
            return problem(
                Outcome.NOT_FOUND,
                "the auth listener serves /auth/nginx, /auth/traefik, /auth/caddy, "
                "/auth/envoy/..., POST /v1/usage and POST /v1/verify",
            )
        return await self.check(proxy, caller, request)

    async def check(self, proxy: Proxy, caller: Caller, request: Incoming) -> Answer:
        """Authorize the original request a check request names."""
        started = time.perf_counter()
        original = original_request(caller, request.method, request.raw_path, request.headers)
        if isinstance(original, str):
            return _answer(caller, problem(Outcome.INVALID_REQUEST, original))
        try:
            as_sent = request.as_aiohttp(original.method, original.target)
        except ValueError:  # yarl refused it
            detail = "the original request's target is not a valid URL"
            return _answer(caller, problem(Outcome.INVALID_REQUEST, detail))
        ctx = RequestContext(as_sent, request_id(request.headers.get(REQUEST_ID)))
        refused: web.StreamResponse | None = None
        for step in proxy.chain:
            refused = await step(proxy.deps, ctx)
            if refused is not None:
                break
        answer: Answer
        if refused is None:
            answer = self._allow(proxy, ctx)
        else:
            refused.headers[REQUEST_ID] = ctx.request_id
            answer = _answer(caller, refused, ctx.outcome)
        route = ctx.match.route.name if ctx.match is not None else ctx.endpoint
        total = time.perf_counter() - started
        proxy.metrics.request(route, original.method, answer.status, ctx.outcome.value, total, None)
        return answer

    def _allow(self, proxy: Proxy, ctx: RequestContext) -> Allowed:
        # All four identity headers on every allow, empty when unknown (fail_open, or no
        # ledger entry): a proxy copying an absent one may pass its template text on
        # (Caddy 2.6 does).
        headers: dict[str, str] = {
            REQUEST_ID: ctx.request_id,
            "X-Keygate-Key-Id": "",
            "X-Keygate-Workspace-Id": "",
            "X-Keygate-Scopes": "",
            "X-Keygate-Request-Id": "",
        }
        decision, key, policy = ctx.decision, ctx.key, ctx.policy
        if decision is not None and decision.rate is not None:
            headers.update(ratelimit.headers(decision.rate))
        if key is not None:
            headers["X-Keygate-Key-Id"] = key.id
            headers["X-Keygate-Workspace-Id"] = key.workspace_id
            headers["X-Keygate-Scopes"] = key.scopes_header
        if decision is None or key is None or policy is None:  # fail_open: nothing held
            return Allowed(headers)
        if decision.entry:
            held_by = key.workspace_id if ctx.workspace is not None else None
            headers["X-Keygate-Request-Id"] = request_token(key.id, decision.entry, held_by)
        assert ctx.match is not None
        rule = ctx.match.route.cost
        if rule is None or rule.fixed is not None:
            # Known in advance: charged now, as the proxy would after a 200. (A route
            # that charges nothing may still hold a max_in_flight slot: freed now.)
            ctx.upstream_status, ctx.responded = 200, True
            ctx.charged = proxy.settlements.settle(ctx, decision, policy.meter())
        return Allowed(headers)


def _answer(
    caller: Caller, refused: web.StreamResponse, outcome: Outcome | None = None
) -> web.StreamResponse:
    """A refusal in the caller's contract (see the module docstring)."""
    if caller != "nginx" or refused.status in (401, 403):
        if caller == "nginx" and outcome is not None:
            refused.headers[_REASON] = outcome.value
            refused.headers[_STATUS] = str(refused.status)
        return refused
    assert isinstance(refused, web.Response)
    mapped = web.Response(
        status=403, body=refused.body, content_type=refused.content_type, headers=None
    )
    for name, value in refused.headers.items():
        if name.lower() not in ("content-type", "content-length"):
            mapped.headers.add(name, value)
    mapped.headers[_STATUS] = str(refused.status)
    mapped.headers[_REASON] = outcome.value if outcome is not None else "invalid_request"
    return mapped
