"""Usage by model: every settlement carries its request's token usage, and settle.lua (or
the authorize script, for a settlement that rides along) adds it to the key's and the
workspace's usage per model, per day, ISO week and month, once per ledger entry, with at
most 32 named models per bucket (the rest under ``other``). Settled through the real
Settlements and scripts on the session's Redis; read back from Redis, the admin API, the
key's own report (what ``GET /v1/key`` answers) and the CLI."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, make_mocked_request

from gateway.admin.app import build_admin_app
from gateway.config.load import build
from gateway.config.model import Settings
from gateway.metrics import Metrics
from gateway.policies.cost import CostMeter, meter_for
from gateway.policies.limits import RoutePolicy
from gateway.policies.llm_usage import TokenUsage
from gateway.proxy.authorize import Decision, KeyAuthorizer
from gateway.proxy.context import RequestContext
from gateway.proxy.settle import MAX_MODEL_BYTES, Settlements, usage_note
from gateway.proxy.workspace import WORKSPACE_RESERVE, WorkspaceHold, workspace_keys
from gateway.store.cluster_multiplex import multiplexer_for
from gateway.store.connection import StoreClient
from gateway.store.keystore import Issued, KeyStore
from gateway.store.names import KeyNames
from gateway.store.record import SpendCap
from gateway.store.report import UsageReport
from gateway.usage.periods import PERIODS, FixedClock, bucket
from tests.conftest import bearer
from tests.procs import KEYGATE, Result, clean_env, write_config

ROUTE = {
    "name": "llm",
    "path": "/v1/chat/completions",
    "upstream": "llm",
    "cost": {"header": "X-Usage-Cost"},
    "reserve": 1.0,  # 1_000_000 micro-units held per request
}
GPT = TokenUsage("gpt-4o-mini", input=1200, output=300)
CLAUDE = TokenUsage("claude-sonnet-4", input=10, output=20)


@dataclass
class Settling:
    """A key's authorizations and settlements as the proxy makes them."""

    settings: Settings
    names: KeyNames
    clock: FixedClock
    store: KeyStore
    authorizer: KeyAuthorizer
    settlements: Settlements
    policy: RoutePolicy
    redis: StoreClient

    async def admit(self, secret: str) -> Decision:
        decision = await self.authorizer.authorize(secret, self.policy, "POST")
        assert decision.status == "ok" and decision.entry, decision
        return decision

    def queue(self, decision: Decision, actual: int, usage: TokenUsage | None) -> None:
        lease = int(self.policy.lease_ms)
        self.settlements.queue(
            decision.settle_keys, decision.entry, actual, lease, usage_note(usage)
        )

    async def settle(self, decision: Decision, actual: int, usage: TokenUsage | None) -> None:
        self.queue(decision, actual, usage)
        await self.settlements.drain()

    def bucket(self, period: str) -> str:
        return bucket(period, self.clock.now_ms).name  # type: ignore[arg-type]

    async def models(self, key_id: str, period: str = "daily") -> dict[str, str]:
        found: dict[str, str] = await self.redis.hgetall(  # type: ignore[assignment]
            self.names.model_usage(key_id, self.bucket(period))
        )
        return found

    async def report(self, secret: str) -> dict[str, Any]:
        """What GET /v1/key answers in ``data`` (proxy/own_key.py renders this reply)."""
        reply = await self.authorizer.report(secret)
        assert reply is not None
        return UsageReport.from_reply(reply).to_json()


@pytest.fixture
async def settling(
    redis_url: str, key_prefix: str, tmp_path: Path, redis: StoreClient
) -> AsyncIterator[Settling]:
    raw = {
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "upstreams": {"llm": {"url": "http://127.0.0.1:9"}},
        "routes": [ROUTE],
    }
    settings = build(raw, tmp_path)
    names = KeyNames(key_prefix)
    seconds, micros = await redis.time()
    clock = FixedClock(int(seconds) * 1000 + int(micros) // 1000)
    store = KeyStore(redis, names, settings.keys.secret_prefix, clock)
    await store.scripts.load()
    mux = multiplexer_for(settings.redis, redis_url)
    authorizer = KeyAuthorizer(mux, names, 100, settings.keys.secret_prefix, clock)
    settlements = Settlements(authorizer, Metrics())
    policy = RoutePolicy.of(settings.routes[0])
    yield Settling(settings, names, clock, store, authorizer, settlements, policy, redis)
    await settlements.drain()
    await mux.close()


MakeKey = Callable[..., Awaitable[Issued]]


@pytest.fixture
def new_key(settling: Settling) -> MakeKey:
    async def make(**values: Any) -> Issued:
        values.setdefault("workspace_id", "ws-models")
        values.setdefault("user_id", str(uuid.uuid4()))
        values["scopes"] = tuple(values.get("scopes", ()))
        return await settling.store.create(values)

    return make


@pytest.fixture
async def admin(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settling: Settling,
    new_key: MakeKey,
) -> tuple[TestClient[Any, Any], dict[str, str]]:
    """The admin API on this test's store (and its clock), and an admin key's header."""
    client = await aiohttp_client(build_admin_app(settling.settings, settling.store))
    issued = await new_key(scopes=["*"])
    return client, bearer(issued.secret)


def _secret(issued: Issued) -> str:
    assert issued.secret is not None
    return issued.secret


async def test_usage_is_kept_per_model_per_day_week_and_month(
    settling: Settling, new_key: MakeKey, admin: tuple[TestClient[Any, Any], dict[str, str]]
) -> None:
    issued = await new_key()
    key_id, secret = issued.record.id, _secret(issued)
    first, second, third = [await settling.admit(secret) for _ in range(3)]
    settling.queue(first, 250_000, GPT)
    settling.queue(second, 120_000, GPT)
    settling.queue(third, 5, CLAUDE)
    await settling.settlements.drain()

    for period in PERIODS:  # the actual cost, not the reservation or the delta against it
        assert await settling.models(key_id, period) == {
            "gpt-4o-mini": "370000 2400 600 2",
            "claude-sonnet-4": "5 10 20 1",
        }
        # The key's usage bucket and its model bucket expire together (92 days, ...).
        usage = settling.names.usage(key_id, settling.bucket(period))
        models = settling.names.model_usage(key_id, settling.bucket(period))
        assert await settling.redis.pexpiretime(models) == await settling.redis.pexpiretime(usage)
        assert await settling.redis.pexpiretime(models) > settling.clock.now_ms

    gpt = {"cost": 0.37, "input_tokens": 2400, "output_tokens": 600, "requests": 2}
    claude = {"cost": 0.000005, "input_tokens": 10, "output_tokens": 20, "requests": 1}
    expected = {p: {"gpt-4o-mini": gpt, "claude-sonnet-4": claude} for p in PERIODS}
    own = await settling.report(secret)
    assert own["usage_by_model"] == expected
    assert list(own["usage_by_model"]["daily"]) == ["gpt-4o-mini", "claude-sonnet-4"]
    assert own["usage_daily"] == 0.370005

    client, headers = admin
    shown = await client.get(f"/v1/keys/{key_id}", headers=headers)
    assert shown.status == 200
    assert (await shown.json())["usage_by_model"] == expected
    listed = await client.get("/v1/keys?workspace_id=ws-models", headers=headers)
    rows = {row["id"]: row for row in (await listed.json())["data"]}
    assert rows[key_id]["usage_by_model"] == expected

    history = await client.get(f"/v1/keys/{key_id}/usage", headers=headers)
    assert history.status == 200
    body = await history.json()
    for period in PERIODS:
        assert body[period][-1]["models"] == expected[period]  # the current period, last
        assert all("models" not in point for point in body[period][:-1])


async def test_a_settlement_without_token_usage_counts_no_model(
    settling: Settling, new_key: MakeKey
) -> None:
    issued = await new_key()
    decision = await settling.admit(_secret(issued))
    await settling.settle(decision, 300_000, None)
    assert await settling.models(issued.record.id) == {}
    report = await settling.report(_secret(issued))
    assert report["usage_daily"] == 0.3
    assert report["usage_by_model"] == {"daily": {}, "weekly": {}, "monthly": {}}


async def test_settling_an_entry_twice_counts_its_usage_once(
    settling: Settling, new_key: MakeKey
) -> None:
    issued = await new_key()
    first, second = [await settling.admit(_secret(issued)) for _ in range(2)]
    # Twice in one call, then again in a call of its own (a retried settlement).
    settling.queue(first, 100, GPT)
    settling.queue(first, 100, GPT)
    await settling.settlements.drain()
    await settling.settle(first, 100, GPT)
    await settling.settle(second, 7, GPT)
    await settling.settle(second, 7, CLAUDE)  # already settled: its note changes nothing
    assert await settling.models(issued.record.id) == {"gpt-4o-mini": "107 2400 600 2"}
    assert (await settling.report(_secret(issued)))["usage_daily"] == 0.000107


async def test_a_bucket_keeps_32_models_and_counts_the_rest_as_other(
    settling: Settling, new_key: MakeKey
) -> None:
    issued = await new_key()
    secret = _secret(issued)
    decisions = [await settling.admit(secret) for _ in range(41)]
    for i, decision in enumerate(decisions[:40]):  # all in one settle.lua call
        settling.queue(decision, 1_000 + i, TokenUsage(f"model-{i:02d}", input=10, output=5))
    await settling.settlements.drain()
    # A model that has its field still counts under its own name once the bucket is full.
    await settling.settle(decisions[40], 1, TokenUsage("model-00", input=1, output=1))

    for period in PERIODS:
        found = await settling.models(issued.record.id, period)
        assert len(found) == 33
        assert found["model-00"] == "1001 11 6 2"
        assert found["model-31"] == "1031 10 5 1"
        assert "model-32" not in found
        assert found["other"] == f"{sum(range(1_032, 1_040))} 80 40 8"
    shown = (await settling.report(secret))["usage_by_model"]["monthly"]
    assert len(shown) == 33
    assert shown["other"] == {
        "cost": 0.008284,
        "input_tokens": 80,
        "output_tokens": 40,
        "requests": 8,
    }


async def test_a_settlement_riding_along_with_an_authorization_records_its_usage(
    settling: Settling, new_key: MakeKey
) -> None:
    issued = await new_key()
    first = await settling.admit(_secret(issued))
    settling.queue(first, 400_000, GPT)
    # Authorized in the same loop turn: the settlement goes in that authorize script.
    await settling.admit(_secret(issued))
    assert not settling.settlements.pending  # no settle.lua call of its own
    assert await settling.models(issued.record.id) == {"gpt-4o-mini": "400000 1200 300 1"}
    await settling.settle(first, 400_000, GPT)  # sent again: nothing changes
    assert await settling.models(issued.record.id, "weekly") == {"gpt-4o-mini": "400000 1200 300 1"}


async def test_a_settlement_after_its_lease_was_resolved_records_its_usage_once(
    settling: Settling, new_key: MakeKey
) -> None:
    issued = await new_key()
    late = await settling.admit(_secret(issued))
    settling.clock.advance(int(settling.policy.lease_ms) + 1)
    await settling.admit(_secret(issued))  # resolves the expired entry (charged)
    await settling.settle(late, 2_000, CLAUDE)
    await settling.settle(late, 2_000, CLAUDE)
    assert await settling.models(issued.record.id, "monthly") == {"claude-sonnet-4": "2000 10 20 1"}


def _context(
    settling: Settling, decision: Decision, hold: WorkspaceHold | None = None
) -> RequestContext:
    """A request that was answered 200: what ``Settlements.settle`` reads of it."""
    ctx = RequestContext(make_mocked_request("POST", "/v1/chat/completions"), "req")
    ctx.policy, ctx.decision, ctx.workspace = settling.policy, decision, hold
    ctx.upstream_status, ctx.responded = 200, True
    return ctx


def _meter(settling: Settling, cost: str, usage: TokenUsage) -> CostMeter:
    """The route's meter after a response stating ``cost``, with the token usage an LLM
    route's meter sets."""
    rule = settling.settings.routes[0].cost
    assert rule is not None
    meter = meter_for(rule)
    meter.see_headers(200, {"X-Usage-Cost": cost})
    meter.usage = usage
    return meter


async def test_an_estimated_usage_is_charged_at_most_the_reservation(
    settling: Settling, new_key: MakeKey
) -> None:
    issued = await new_key()
    cut, whole = [await settling.admit(_secret(issued)) for _ in range(2)]
    estimate = TokenUsage("gpt-4o-mini", input=100, output=900, estimated=True)
    meter = _meter(settling, "5", estimate)  # more than the 1.0 reserved
    assert settling.settlements.settle(_context(settling, cut), cut, meter) == 1_000_000
    meter = _meter(settling, "5", TokenUsage("gpt-4o-mini", input=100, output=900))
    charged = settling.settlements.settle(_context(settling, whole), whole, meter)
    assert charged == 5_000_000  # the provider's usage may say more than the reservation
    await settling.settlements.drain()
    assert await settling.models(issued.record.id) == {"gpt-4o-mini": "6000000 200 1800 2"}


async def test_a_workspace_keeps_usage_per_model(
    settling: Settling,
    new_key: MakeKey,
    admin: tuple[TestClient[Any, Any], dict[str, str]],
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
) -> None:
    workspace = "ws-budget"
    await settling.store.workspaces.set_caps(workspace, (SpendCap(100_000_000, "monthly"),))
    issued = await new_key(workspace_id=workspace)
    decision = await settling.admit(_secret(issued))
    keys = workspace_keys(settling.names, workspace)
    reserved = await settling.authorizer.redis.evalsha(
        WORKSPACE_RESERVE,
        keys[:4],
        (settling.clock(), decision.held_micro, decision.entry, settling.policy.lease_ms, "c"),
    )
    assert reserved[0] in ("ok", b"ok")
    hold = WorkspaceHold(keys, decision.entry)
    ctx = _context(settling, decision, hold)
    settling.settlements.settle(ctx, decision, _meter(settling, "0.25", GPT))
    await settling.settlements.drain()
    # Settled again (a retry): the workspace counts it once too.
    settling.settlements.queue(keys, decision.entry, 250_000, 60_000, usage_note(GPT))
    await settling.settlements.drain()

    daily = settling.names.workspace_model_usage(workspace, settling.bucket("daily"))
    assert await settling.redis.hgetall(daily) == {"gpt-4o-mini": "250000 1200 300 1"}
    assert await settling.models(issued.record.id) == {"gpt-4o-mini": "250000 1200 300 1"}
    gpt = {"cost": 0.25, "input_tokens": 1200, "output_tokens": 300, "requests": 1}
    budget = (await settling.store.workspaces.get(workspace)).to_json()
    assert budget["usage_by_model"] == {p: {"gpt-4o-mini": gpt} for p in PERIODS}
    assert budget["usage"]["monthly"] == 0.25

    client, headers = admin
    served = await client.get(f"/v1/workspaces/{workspace}", headers=headers)
    assert served.status == 200
    assert (await served.json())["usage_by_model"]["monthly"] == {"gpt-4o-mini": gpt}

    cli = _cli(tmp_path, redis_url, key_prefix)
    shown, text = await asyncio.gather(
        cli("workspaces", "show", workspace, "--json"), cli("workspaces", "show", workspace)
    )
    assert shown.code == 0 and shown.json()["usage_by_model"]["monthly"] == {"gpt-4o-mini": gpt}
    assert text.code == 0
    rows = [line.split() for line in text.out.splitlines()]
    assert ["PERIOD", "MODEL", "COST", "INPUT_TOKENS", "OUTPUT_TOKENS", "REQUESTS"] in rows
    assert ["monthly", "gpt-4o-mini", "0.25", "1200", "300", "1"] in rows


async def test_keys_usage_prints_a_table_per_model(
    settling: Settling, new_key: MakeKey, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    issued = await new_key()
    first, second = [await settling.admit(_secret(issued)) for _ in range(2)]
    settling.queue(first, 1_500_000, GPT)
    settling.queue(second, 2, CLAUDE)
    await settling.settlements.drain()

    cli = _cli(tmp_path, redis_url, key_prefix)
    text, as_json = await asyncio.gather(
        cli("keys", "usage", issued.record.id, "--period", "daily"),
        cli("keys", "usage", issued.record.id, "--json"),
    )
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    at = lines.index("by model")
    assert lines[at + 1].split() == [
        "PERIOD",
        "MODEL",
        "COST",
        "INPUT_TOKENS",
        "OUTPUT_TOKENS",
        "REQUESTS",
    ]
    day = bucket("daily", settling.clock.now_ms).label
    assert [line.split() for line in lines[at + 2 :]] == [
        [day, "gpt-4o-mini", "1.5", "1200", "300", "1"],
        [day, "claude-sonnet-4", "0.000002", "10", "20", "1"],
    ]
    points = {p["period"]: p for p in as_json.json()["monthly"]}
    month = bucket("monthly", settling.clock.now_ms).label
    assert points[month]["models"]["claude-sonnet-4"]["requests"] == 1


async def test_a_model_name_that_would_not_parse_is_cleaned_and_clipped(
    settling: Settling, new_key: MakeKey
) -> None:
    issued = await new_key()
    decision = await settling.admit(_secret(issued))
    name = "evil\tmodel\n" + "é" * 200  # 2 bytes each: clipped at a character's end
    await settling.settle(decision, 9, TokenUsage(name, input=1, output=2))
    found = await settling.models(issued.record.id)
    (model,) = found
    assert model.startswith("evil model é")
    assert len(model.encode()) == MAX_MODEL_BYTES - 1  # 11 + 58 * 2: no half character
    assert found[model] == "9 1 2 1"


def test_the_usage_note() -> None:
    assert usage_note(None) == ""
    assert usage_note(GPT) == "gpt-4o-mini\t1200\t300"
    assert usage_note(TokenUsage("", input=3, output=4)) == "unknown\t3\t4"
    assert usage_note(TokenUsage("\t\n", input=3, output=4)) == "unknown\t3\t4"
    clipped = usage_note(TokenUsage("m" * 300, input=1, output=1))
    assert clipped == "m" * MAX_MODEL_BYTES + "\t1\t1"


def _cli(tmp_path: Path, redis_url: str, key_prefix: str) -> Callable[..., Awaitable[Result]]:
    """``await cli("keys", "usage", ...)``: the real keygate command on this test's store."""
    config = write_config(
        tmp_path / "gateway.yaml",
        {"redis": {"url": redis_url, "key_prefix": key_prefix}, "log": {"level": "warning"}},
    )

    async def run(*args: str) -> Result:
        process = await asyncio.create_subprocess_exec(
            *KEYGATE,
            *args,
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=clean_env(),
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        assert "Traceback" not in err.decode(), err.decode()
        return Result(process.returncode, out.decode(), err.decode())

    return run
