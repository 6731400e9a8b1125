"""The authorize script assembled from the policies agrees with the Python side: every
argument a policy builds lands where its fragment reads it, every record field where it
is read, and every refusal's reply decodes back to the policy's typed value, on a real
Redis; a policy added to the chain shifts nothing by hand."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gateway.config.load import build
from gateway.config.model import Route, Settings
from gateway.errors import Outcome
from gateway.policies.chain import AUTHORIZE_POLICIES
from gateway.policies.layout import EXPIRED, FRAME_KEYS, HEAD, LayoutError, assemble
from gateway.policies.limits import RoutePolicy
from gateway.policies.policy import Asked, Policy, Refusal
from gateway.policies.ratelimit import RateState
from gateway.policies.spend import BlockedCap
from gateway.policies.tokens import TokenRefusal
from gateway.proxy.authorize import AUTHORIZE, LAYOUT, WRITTEN, Decision, KeyAuthorizer
from gateway.store.cluster_multiplex import Multiplexer, multiplexer_for
from gateway.store.names import KeyNames
from gateway.store.record import MICRO, RateLimitSpec, SpendCap, TokenLimitSpec
from gateway.store.scripts import frame_source, library_source
from tests.conftest import MakeKey

ROUTES: list[dict[str, Any]] = [
    {"name": "plain", "path": "/plain", "upstream": "u"},
    {
        "name": "all",
        "path": "/all",
        "upstream": "u",
        "scopes": {"*": ["chat:invoke"], "GET": ["echo:read", "chat:read"]},
        "resource": {"query": "model"},
        "rate_limit": {"requests": 2, "period_seconds": 60},
        "cost": {"fixed": 0.25},
        "byok": True,
    },
    {"name": "priced", "path": "/priced", "upstream": "u", "cost": {"fixed": 0.25}},
]


@pytest.fixture
def routed(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    raw = {
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "upstreams": {"u": {"url": "http://127.0.0.1:9"}},
        "routes": ROUTES,
    }
    return build(raw, tmp_path)


@pytest.fixture
async def authorizer(routed: Settings, redis_url: str) -> AsyncIterator[KeyAuthorizer]:
    mux: Multiplexer = multiplexer_for(routed.redis, redis_url)
    yield KeyAuthorizer(mux, KeyNames(routed.redis.key_prefix), 64, routed.keys.secret_prefix)
    await mux.close()


def _route(settings: Settings, name: str) -> Route:
    return next(route for route in settings.routes if route.name == name)


def test_the_chain_is_unkeys_order_and_the_reply_head_is_fixed() -> None:
    assert [p.name for p in LAYOUT.policies] == [
        "scopes",
        "resource",
        "rate_limit",
        "concurrency",
        "token_limits",
        "spend_caps",
    ]
    # What other modules read by position: the identity and the expired counts (settle.py,
    # the workspace budget), the ledger entry's flag right after the notes.
    assert (EXPIRED, HEAD) == (9, 11)
    assert sum(len(p.note_names) for p in AUTHORIZE_POLICIES) + HEAD == WRITTEN
    # The frame's names first, settle.lua's in its order; then the policies' own.
    assert LAYOUT.keys == (*FRAME_KEYS, "rate_limit.rate", "rate_limit.route_rate")
    assert FRAME_KEYS == ("record", "usage", "ledger", "entries", "pending")


def test_each_argument_name_is_bound_where_the_layout_puts_it() -> None:
    """Every ARG.<name> of every fragment became ARGV[i] with args[i-1] its qualified
    name, every FIELD.<name> f[i] with fields[i-1] the name: checked on the assembled
    text, fragment by fragment."""
    script = LAYOUT.script
    for policy in AUTHORIZE_POLICIES:
        sections = LAYOUT.bound[policy.name]
        for text in sections.values():
            assert text.strip() in script, policy.name
        bound = "\n".join(sections.values())
        for name in (*policy.request_arg_names, *policy.method_arg_names, *policy.route_arg_names):
            at = LAYOUT.arg(f"{policy.name}.{name}") + 1
            assert f"ARGV[{at}]" in bound, (policy.name, name)
        for name in policy.fields:
            assert f"f[{LAYOUT.fields.index(name) + 1}]" in bound, (policy.name, name)
        assert not re.search(r"\b(ARG|FIELD|KEY)\.[a-z]", bound), policy.name
    assert f"'{LAYOUT.fields[0]}', '{LAYOUT.fields[1]}'" in script  # the HMGET list


def test_a_routes_arguments_fill_every_slot_of_the_layout(routed: Settings) -> None:
    """The per-request arguments the authorizer sends have exactly the layout's length,
    and each policy's values sit at its names' positions."""
    policy = RoutePolicy.of(_route(routed, "all"))
    frame = ["digest", "clock", *["h"] * 7, "entry-id"]
    args = [*frame, *policy.args("GET", "gpt")]
    assert len(args) == len(LAYOUT.args)
    expect = {
        "entry": "entry-id",
        "scopes.needed": "echo:read chat:read",
        "resource.state": "2",
        "resource.resource": "gpt",
        "rate_limit.requests": "2",
        "rate_limit.period_ms": "60000",
        "spend_caps.reserve": str(MICRO // 4),
        "spend_caps.byok": "1",
        "lease_ms": policy.lease_ms,
        "on_expiry": "c",
    }
    assert {name: args[LAYOUT.arg(name)] for name in expect} == expect
    args = [*frame, *policy.args("POST", None)]
    assert args[LAYOUT.arg("scopes.needed")] == "chat:invoke"
    assert args[LAYOUT.arg("resource.state")] == "1"  # not read yet: the key decides
    # A method the route does not name, and a route naming no resource: the same slots.
    assert [*frame, *policy.args("PROPFIND", "x")][LAYOUT.arg("scopes.needed")] == "chat:invoke"
    plain = RoutePolicy.of(_route(routed, "plain"))
    args = [*frame, *plain.args("GET", None)]
    assert len(args) == len(LAYOUT.args)
    assert (args[LAYOUT.arg("resource.state")], args[LAYOUT.arg("spend_caps.reserve")]) == ("0", "")
    assert args[LAYOUT.arg("rate_limit.requests")] == ""


async def _decide(
    authorizer: KeyAuthorizer, settings: Settings, secret: str, route: str, **kw: Any
) -> Decision:
    policy = RoutePolicy.of(_route(settings, route))
    return await authorizer.authorize(
        secret,
        policy,
        kw.get("method", "POST"),
        kw.get("resource", "gpt"),
        tokens=kw.get("tokens"),
    )


async def test_every_refusal_round_trips_to_its_typed_value(
    authorizer: KeyAuthorizer, routed: Settings, make_key: MakeKey
) -> None:
    seen: dict[str, Decision] = {}

    async def decide(secret: str | None, route: str, **kw: Any) -> Decision:
        assert secret is not None
        decision = await _decide(authorizer, routed, secret, route, **kw)
        seen[decision.status] = decision
        return decision

    scoped = await make_key(scopes=["chat:invoke"], resources=["gpt"])
    denied = await decide(scoped.secret, "all", method="GET")
    assert denied.status == "forbidden_scope" and denied.refused is None
    assert denied.rate is not None and denied.rate.policy == '"route";q=2;w=60'
    assert (await decide(scoped.secret, "all", resource=None)).status == "need_resource"
    assert (await decide(scoped.secret, "all", resource="other")).status == "forbidden_resource"

    rated = await make_key(scopes=["chat:invoke"], rate_limit=RateLimitSpec(1, 60))
    assert (await decide(rated.secret, "all")).status == "ok"
    limited = await decide(rated.secret, "all")
    assert limited.status == "rate_limited"
    assert isinstance(limited.refused, RateState) and limited.refused == limited.rate
    assert limited.refused.policy == '"key";q=1;w=60' and limited.refused.retry_after >= 59

    busy = await make_key(max_in_flight=1)
    first = await decide(busy.secret, "plain")
    assert first.status == "ok" and first.entry and first.held_micro == 0
    refused = await decide(busy.secret, "plain")
    assert (refused.status, refused.refused) == ("concurrency_limited", 1)

    tokened = await make_key(token_limits=(TokenLimitSpec(100, 60),))
    assert (await decide(tokened.secret, "priced", tokens=60)).status == "ok"
    over = await decide(tokened.secret, "priced", tokens=60)
    assert over.status == "token_rate_limited"
    assert isinstance(over.refused, TokenRefusal)
    assert (over.refused.tokens, over.refused.period_ms, over.refused.used) == (100, 60_000, 60)
    assert over.refused.estimate == 60 and 0 < over.refused.reset_ms <= 60_000

    capped = await make_key(limit_micro=MICRO // 10, limit_reset="daily")
    spent = await decide(capped.secret, "priced")
    assert spent.status == "spend_limited"
    cap = spent.refused
    assert isinstance(cap, BlockedCap)
    assert (cap.name, cap.amount_micro, cap.period, cap.counted_micro) == (
        "limit",
        MICRO // 10,
        "daily",
        0,
    )
    assert cap.resets_at_ms is not None and cap.resets_at_ms > spent.now_ms

    ok = await decide((await make_key()).secret, "priced")
    assert (ok.status, ok.held_micro, ok.rate) == ("ok", MICRO // 4, None)
    assert ok.entry and ok.key is not None and not ok.key.workspace_capped

    # Every status a policy refuses with was produced and decoded above.
    assert set(LAYOUT.refusers) <= set(seen)


async def test_every_refusal_gets_the_policys_own_response(
    authorizer: KeyAuthorizer, routed: Settings, make_key: MakeKey
) -> None:
    """Each policy's refusal from a real reply: the outcome the chain promises."""
    policy = RoutePolicy.of(_route(routed, "all"))
    key = await make_key(scopes=["chat:invoke"], resources=["gpt"], max_in_flight=1)
    assert (await _decide(authorizer, routed, key.secret or "", "all")).status == "ok"
    decision = await _decide(authorizer, routed, key.secret or "", "all")
    assert decision.status == "concurrency_limited"
    refuser = LAYOUT.refusers[decision.status]
    asked = Asked("POST", "gpt", ("chat:invoke",), decision.now_ms)
    refusal = refuser.policy.refusal(
        decision.status, decision.refused, policy.sides[refuser.index], asked
    )
    assert refusal.outcome is Outcome.CONCURRENCY_LIMITED
    assert refusal.headers == {"Retry-After": "1"}
    assert "allows 1 requests in flight" in refusal.detail


class _Named(Policy[str]):
    """A policy added for the test: refuses a key whose name the route forbids, answering
    with the name it read. Needs nothing but this class and a place in the list."""

    name = "named"
    fields: ClassVar[tuple[str, ...]] = ("name", "total_uses")
    route_arg_names = ("forbidden",)
    refusals: ClassVar[tuple[tuple[str, int], ...]] = (("forbidden_name", 2),)
    lua = """
--@check
if FIELD.name == ARG.forbidden then
  return refuse('forbidden_name', FIELD.name, FIELD.total_uses or '0')
end
"""

    def route_side(self, route: Route) -> str:
        return "blocked"

    def route_args(self, side: str) -> tuple[str, ...]:
        return (side,)

    def decode(self, status: str, notes: Sequence[Any], values: Sequence[Any]) -> tuple[str, int]:
        name, uses = values
        return (name.decode() if isinstance(name, bytes) else str(name), int(uses))

    def refusal(self, status: str, refused: Any, side: str, asked: Asked) -> Refusal:
        return Refusal(Outcome.FORBIDDEN, f"no key named {refused[0]}")


async def test_a_policy_added_mid_chain_is_bound_and_decoded(
    redis: Any, key_prefix: str, make_key: MakeKey
) -> None:
    """A policy inserted before the rate limit moves every later argument, field and reply
    value; the assembled script still reads them where the Python side puts them."""
    chain = (*AUTHORIZE_POLICIES[:2], _Named(), *AUTHORIZE_POLICIES[2:])
    layout = assemble(frame_source("authorize"), chain)
    assert layout.arg("rate_limit.requests") == LAYOUT.arg("rate_limit.requests") + 1
    script = redis.register_script(library_source() + "\n" + layout.script)
    names = KeyNames(key_prefix)
    issued = await make_key(name="blocked", limit_micro=MICRO, rate_limit=RateLimitSpec(5, 60))
    key_id = issued.record.id
    keys = layout.key_names(names, key_id, "r")
    args = layout.pack(
        {
            "digest": issued.record.hash,
            "entry": "e-1",
            "resource.state": "0",
            "named.forbidden": "blocked",
            "lease_ms": 60_000,
            "on_expiry": "c",
            "spend_caps.reserve": 1000,
            "spend_caps.byok": "0",
        }
    )
    reply = await script(keys=keys, args=args)
    assert reply[0] in ("forbidden_name", b"forbidden_name")
    refuser = layout.refusers["forbidden_name"]
    assert refuser.policy.decode("forbidden_name", reply[refuser.notes], reply[refuser.values]) == (
        "blocked",
        0,
    )
    notes = layout.notes["rate_limit"]
    assert reply[notes.start] in ('"key";q=5;w=60', b'"key";q=5;w=60')
    args[layout.arg("named.forbidden")] = "someone else"
    reply = await script(keys=keys, args=args)
    assert reply[0] in ("ok", b"ok")
    assert int(reply[layout.written]) == 1 and int(reply[layout.ok["spend_caps.held"]]) == 1000
    assert await redis.hget(names.ledger_entries(key_id), "e-1")


def test_the_assembler_refuses_names_nobody_declared() -> None:
    frame = frame_source("authorize")

    class Undeclared(_Named):
        lua = _Named.lua.replace("ARG.forbidden", "ARG.other")

    class Unread(_Named):
        fields: ClassVar[tuple[str, ...]] = ("name", "total_uses", "label")

    class Silent(_Named):
        refusals: ClassVar[tuple[tuple[str, int], ...]] = (("forbidden_name", 2), ("never", 0))

    for broken in (Undeclared(), Unread(), Silent()):
        with pytest.raises(LayoutError):
            assemble(frame, (*AUTHORIZE_POLICIES, broken))
    with pytest.raises(LayoutError):  # a status twice
        assemble(frame, (*AUTHORIZE_POLICIES, _Named(), _Named()))


def test_the_proxy_runs_the_assembled_script() -> None:
    assert AUTHORIZE.source == library_source() + "\n" + LAYOUT.script
    assert "--@" not in LAYOUT.script.replace("--@ lines", "")


@pytest.mark.single_server
async def test_an_authorization_runs_the_redis_commands_of_its_checks_and_no_more(
    routed: Settings, redis_url: str, redis: Any, make_key: MakeKey
) -> None:
    """A key with a rate limit, max_in_flight and two caps, on a route that charges, in
    the steady state (buckets and record exist; last_used_at written under a second ago):
    one HMGET, the ledger's due entries, the rate state, the in-flight count, one GET per
    cap; then the rate state, the four usage buckets, the ledger entry (ZADD, HSET), the
    pending id and total_uses. Assembling the script from policies adds no command."""
    issued = await make_key(
        limit_micro=10 * MICRO,
        limit_reset="daily",
        spend_caps=(SpendCap(100 * MICRO, "monthly"),),
        rate_limit=RateLimitSpec(1000, 60),
        max_in_flight=100,
    )
    now_ms = int((await redis.time())[0]) * 1000
    mux = multiplexer_for(routed.redis, redis_url)
    authorizer = KeyAuthorizer(
        mux, KeyNames(routed.redis.key_prefix), 64, routed.keys.secret_prefix, lambda: str(now_ms)
    )
    policy = RoutePolicy.of(_route(routed, "priced"))
    try:
        assert issued.secret is not None
        assert (await authorizer.authorize(issued.secret, policy, "POST")).status == "ok"
        await redis.config_resetstat()
        assert (await authorizer.authorize(issued.secret, policy, "POST")).status == "ok"
        stats = await redis.info("commandstats")
    finally:
        await mux.close()
    ran = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in ("evalsha", "config|resetstat", "info")
    }
    assert ran == {
        "hmget": 1,
        "zrangebyscore": 1,
        "get": 3,  # the rate state, one per cap
        "zcount": 1,
        "set": 1,
        "incrby": 4,
        "zadd": 2,  # the ledger, the pending ids
        "hset": 1,
        "hincrby": 1,
    }
