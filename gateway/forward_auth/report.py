"""The auth listener's two APIs for callers that are services, not proxies.

``POST /v1/usage`` settles a request the auth listener admitted, once its cost is known
(the upstream service, or a log shipper, reports it): ``{"request_id", "cost"}`` or
``{"request_id", "usage": {"model", "input_tokens", "output_tokens"}}`` (priced as the
proxy prices an LLM answer). Settling is settle.lua's, by ledger entry: reporting twice
changes nothing, and a report after the lease was resolved still ends with the actual
cost, once.

``POST /v1/verify`` checks a key for application code: ``{"key", "route" | "method" +
"path", "resource", "cost"}`` -> ``{"valid", "code", "key_id", "workspace_id", "scopes",
"remaining", "request_id", "rate_limit"}``: the same one authorize call as the proxy,
``cost`` (credits, default the route's reservation) charged at once.

Both need a caller key holding ``keys:verify``; a caller without ``org:admin`` settles
and verifies keys of its own workspace only.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from aiohttp import web

from gateway.bodies import ClientLeft, NotJson, parse_json, read_capped
from gateway.credentials import extract
from gateway.errors import Outcome, problem
from gateway.policies.llm_usage import TokenUsage
from gateway.policies.ratelimit import RateState
from gateway.policies.routing import MethodNotAllowed
from gateway.policies.scopes import ORG_ADMIN, grants
from gateway.proxy.authorize import SETTLE, Decision
from gateway.proxy.context import RequestContext
from gateway.proxy.service import Proxy
from gateway.proxy.settle import usage_note
from gateway.proxy.workspace import reserve_workspace, workspace_keys
from gateway.store.connection import STORE_ERRORS
from gateway.store.input import MAX_MONEY
from gateway.store.keystore import KeyStore
from gateway.store.record import MICRO, KeyRecord, from_micro
from gateway.store.report import UsageReport

VERIFY_SCOPE = "keys:verify"
MAX_BODY = 65_536
_MAX_TOKENS = 10**12


class Refused(Exception):
    """Ends a request with a prepared problem."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.reason)
        self.response = response


def _refuse(outcome: Outcome, detail: str, **extra: Any) -> Refused:
    return Refused(problem(outcome, detail, **extra))


async def _caller(proxy: Proxy, request: web.BaseRequest) -> KeyRecord:
    """The calling service's key, which must hold keys:verify."""
    store = proxy.store
    if store is None:
        raise _refuse(Outcome.STORE_ERROR, "the key store is not open")
    found = extract(request.headers, None, proxy.settings.keys.sources, "")
    if found.secret is None:
        raise _refuse(found.outcome, found.detail)
    result = await store.authenticate(found.secret)
    if result.status != "ok" or result.record is None:
        raise _refuse(Outcome.INVALID_KEY, "the caller's API key is not valid")
    if not grants(result.record.scopes, VERIFY_SCOPE):
        raise _refuse(
            Outcome.FORBIDDEN_SCOPE,
            f"this endpoint needs the {VERIFY_SCOPE} scope",
            scope=VERIFY_SCOPE,
        )
    return result.record


async def _body(request: web.BaseRequest) -> dict[str, Any]:
    try:
        raw = await read_capped(request.content, MAX_BODY)
    except ClientLeft:
        raise _refuse(Outcome.INVALID_REQUEST, "the body ended early") from None
    if raw is None:
        raise _refuse(Outcome.PAYLOAD_TOO_LARGE, f"the body exceeds {MAX_BODY} bytes")
    try:
        body = parse_json(raw, constants=False)
    except NotJson as exc:
        raise _refuse(Outcome.INVALID_REQUEST, f"body: {exc}") from None
    if not isinstance(body, dict):
        raise _refuse(Outcome.INVALID_REQUEST, "body: must be a JSON object")
    return body


def _credits(value: Any, field: str) -> int:
    """A non-negative amount of credits in micro-units, rounded half up."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(Outcome.INVALID_REQUEST, f"{field}: must be a number")
    amount = Decimal(repr(value))
    if not amount.is_finite() or amount < 0 or amount > MAX_MONEY:
        raise _refuse(Outcome.INVALID_REQUEST, f"{field}: must be from 0 to {MAX_MONEY}")
    return int((amount * MICRO).to_integral_value(rounding=ROUND_HALF_UP))


def _tokens(usage: dict[str, Any], name: str) -> int:
    value = usage.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TOKENS:
        raise _refuse(Outcome.INVALID_REQUEST, f"usage.{name}: must be a whole number >= 0")
    return value


async def _same_workspace(store: KeyStore, caller: KeyRecord, key_id: str) -> None:
    if grants(caller.scopes, ORG_ADMIN):
        return
    found = await store.client.hget(store.names.record(key_id), "workspace_id")
    workspace = found.decode() if isinstance(found, bytes) else found
    if workspace != caller.workspace_id:  # another workspace's, or no such key: the same 404
        raise _refuse(Outcome.NOT_FOUND, "request_id: no such request in your workspace")


async def report_usage(proxy: Proxy, request: web.BaseRequest) -> web.Response:
    """``POST /v1/usage`` (see the module docstring)."""
    try:
        caller = await _caller(proxy, request)
        body = await _body(request)
        token = body.get("request_id")
        parts = token.split(".", 2) if isinstance(token, str) else []
        if len(parts) < 2 or not all(parts):
            raise _refuse(
                Outcome.INVALID_REQUEST, "request_id: must be an X-Keygate-Request-Id value"
            )
        key_id, entry = parts[0], parts[1]
        workspace_id = parts[2] if len(parts) == 3 else None
        if ("cost" in body) == ("usage" in body):
            raise _refuse(Outcome.INVALID_REQUEST, "body: give exactly one of cost or usage")
        note = ""
        if "cost" in body:
            charged = _credits(body["cost"], "cost")
        else:
            usage = body["usage"]
            if not isinstance(usage, dict) or not isinstance(usage.get("model"), str):
                raise _refuse(Outcome.INVALID_REQUEST, "usage.model: must be a string")
            counted = TokenUsage(
                usage["model"],
                input=_tokens(usage, "input_tokens"),
                output=_tokens(usage, "output_tokens"),
                cache_read=_tokens(usage, "cache_read_tokens"),
                cache_write=_tokens(usage, "cache_write_tokens"),
            )
            prices = proxy.deps.prices
            price = prices.price_of(counted.model, None)
            if price is None:
                raise _refuse(
                    Outcome.UNPRICED_MODEL,
                    f"usage.model: {counted.model[:200]!r} has no price",
                    extra={"model": counted.model[:200]},
                )
            charged, note = prices.cost_micro(price, counted), usage_note(counted)
        assert proxy.store is not None
        await _same_workspace(proxy.store, caller, key_id)
        names = proxy.authorizer.names
        keys = (
            names.record(key_id),
            names.usage(key_id, ""),
            names.ledger(key_id),
            names.ledger_entries(key_id),
            names.pending_ids(key_id),
        )
        clock = proxy.authorizer.clock()
        reply = await proxy.authorizer.redis.evalsha(SETTLE, keys, (clock, entry, charged, note))
        if workspace_id is not None:
            budget = workspace_keys(names, workspace_id)
            await proxy.authorizer.redis.evalsha(SETTLE, budget, (clock, entry, charged, note))
    except Refused as refused:
        return refused.response
    except STORE_ERRORS:
        return problem(Outcome.STORE_ERROR, "the key store is unavailable; retry (it is safe)")
    settled = int(reply[0]) + int(reply[1])
    return web.json_response(
        {
            "request_id": token,
            "charged": from_micro(charged),
            # false: reported before (this report changed nothing), or no such request
            "settled": settled > 0,
        }
    )


async def verify_key(proxy: Proxy, request: web.BaseRequest) -> web.Response:
    """``POST /v1/verify`` (see the module docstring)."""
    try:
        caller = await _caller(proxy, request)
        body = await _body(request)
        secret = body.get("key")
        if not isinstance(secret, str) or not secret:
            raise _refuse(Outcome.INVALID_REQUEST, "key: must be the API key to verify")
        ctx = _context(proxy, request, body)
        assert ctx.policy is not None
        resource = body.get("resource")
        if resource is not None and not isinstance(resource, str):
            raise _refuse(Outcome.INVALID_REQUEST, "resource: must be a string")
        reserve = _credits(body["cost"], "cost") if body.get("cost") is not None else None
        decision = await proxy.authorizer.authorize(
            secret, ctx.policy, ctx.request.method, resource or "", reserve
        )
        lease = int(ctx.policy.lease_ms)
        key = decision.key
        foreign = key is not None and key.workspace_id != caller.workspace_id
        if foreign and not grants(caller.scopes, ORG_ADMIN):  # another workspace's key
            if decision.entry:  # not this caller's business: what it reserved goes back
                proxy.settlements.queue(decision.settle_keys, decision.entry, 0, lease)
            decision = Decision("not_found")
        code, request_id = decision.status, ""
        if decision.status == "ok":
            ctx.key, ctx.decision, ctx.secret = decision.key, decision, secret
            refused = await reserve_workspace(proxy.deps, ctx)
            if refused is not None:
                code = ctx.outcome.value
            elif decision.entry:
                # Charged at once: what was reserved (cost, or the route's reservation).
                held = decision.held_micro
                proxy.settlements.queue(decision.settle_keys, decision.entry, held, lease)
                if ctx.workspace is not None:
                    proxy.settlements.queue(ctx.workspace.keys, decision.entry, held, lease)
                request_id = decision.entry
        report = await proxy.authorizer.report(secret) if decision.key is not None else None
    except Refused as refused_call:
        return refused_call.response
    except STORE_ERRORS:
        return problem(Outcome.STORE_ERROR, "the key store is unavailable; retry shortly")
    key = decision.key if code != "not_found" else None
    remaining = None
    if report is not None:
        left = UsageReport.from_reply(report).limit_remaining_micro
        remaining = None if left is None else from_micro(left)
    return web.json_response(
        {
            "valid": code == "ok",
            "code": "ok" if code == "ok" else _code(code),
            "key_id": key.id if key else None,
            "workspace_id": key.workspace_id if key else None,
            "scopes": list(key.scopes) if key else None,
            "remaining": remaining if key else None,
            "request_id": request_id or None,
            "rate_limit": _rate(decision.rate) if key else None,
        }
    )


_CODES = {"not_found": "invalid_key", "need_resource": "forbidden_resource"}


def _code(status: str) -> str:
    return _CODES.get(status, status)


def _rate(rate: RateState | None) -> dict[str, Any] | None:
    if rate is None:
        return None
    return {"policy": rate.policy, "current": rate.current, "retry_after": rate.retry_after}


def _context(proxy: Proxy, request: web.BaseRequest, body: dict[str, Any]) -> RequestContext:
    """The route a verification is for: by name, or by method and path."""
    ctx = RequestContext(request, "")
    policies = proxy.deps.policies
    name = body.get("route")
    method = body.get("method")
    if method is not None and not isinstance(method, str):
        raise _refuse(Outcome.INVALID_REQUEST, "method: must be a string")
    if name is not None:
        if not isinstance(name, str) or name not in policies:
            raise _refuse(Outcome.INVALID_REQUEST, "route: no such route")
        route = next(r for r in proxy.settings.routes if r.name == name)
        chosen = (method or (route.methods[0] if route.methods else "GET")).upper()
        ctx.policy = policies[name]
        ctx.request = request.clone(method=chosen)
        return ctx
    path = body.get("path")
    if not isinstance(path, str) or not path.startswith("/") or method is None:
        raise _refuse(Outcome.INVALID_REQUEST, "route: give a route name, or method and path")
    found = proxy.deps.router.match(path, method.upper())
    if found is None or isinstance(found, MethodNotAllowed):
        raise _refuse(Outcome.INVALID_REQUEST, "path: no route serves this method and path")
    ctx.match = found
    ctx.policy = policies[found.route.name]
    ctx.request = request.clone(method=method.upper())
    return ctx
