"""The workspace budget's step: after the key's own authorization, reserve the same amount
against its workspace's caps, on the workspace's slot (lua/workspace_reserve.lua).

Two scripts on two slots (on a Redis Cluster, two nodes) cannot be one atomic decision,
so the order is: the key reserves first (authorize.lua), then the workspace; a workspace
refusal hands the key's reservation back at once (settled at 0 through the ledger, which
also frees its max_in_flight slot). The workspace's caps are never passed: its script
alone decides what it admits, atomically. The price is under-admission: while a refused
request's key reservation waits for its compensation (one round trip), the key holds it,
and a request of that key that would have fit may be refused meanwhile.

Workspace caps count non-BYOK spend: a BYOK route (the caller's own upstream credit)
never reserves here. The request's actual cost is settled on the workspace's entry as on
the key's, once (proxy/settle.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.errors import Outcome, problem
from gateway.policies.spend import BlockedCap, spend_refusal
from gateway.proxy.context import RequestContext
from gateway.proxy.steps import StepDeps, respond
from gateway.store.connection import STORE_ERRORS
from gateway.store.multiplex import LuaScript, reply_text
from gateway.store.names import KeyNames
from gateway.store.scripts import script_source

WORKSPACE_RESERVE = LuaScript.from_source(script_source("workspace_reserve"))
# settle.lua's keys for a workspace entry: budget hash (its "record"), usage prefix,
# ledger, ledger entries, pending ids (never written; in the slot for a Cluster's sake).
WorkspaceKeys = tuple[str, str, str, str, str]


@dataclass(frozen=True, slots=True)
class WorkspaceHold:
    """A request's reservation on its workspace: settled with the request's actual cost."""

    keys: WorkspaceKeys
    entry: str  # the ledger entry's id (the key's entry id: unique per authorization)


def workspace_keys(names: KeyNames, workspace_id: str) -> WorkspaceKeys:
    return (
        names.workspace_budget(workspace_id),
        names.workspace_usage(workspace_id, ""),
        names.workspace_ledger(workspace_id),
        names.workspace_ledger_entries(workspace_id),
        names.workspace_pending_ids(workspace_id),
    )


async def reserve_workspace(deps: StepDeps, ctx: RequestContext) -> web.StreamResponse | None:
    """For a key whose workspace has a budget, on a non-BYOK route that charges: reserve
    the key's reservation on the workspace too, or refuse (402 naming
    ``workspace.spend_caps[i]``; 503 on a store error when failing closed), handing the
    key's reservation back at once. Writes ``ctx.workspace`` when it reserved."""
    key, policy, decision = ctx.key, ctx.policy, ctx.decision
    if (
        key is None
        or policy is None
        or decision is None  # let through on a store error (fail_open): nothing reserved
        or not key.workspace_capped
        or policy.reserve == ""
        or policy.byok == "1"
        or not decision.entry
    ):
        return None
    authorizer, settlements, metrics = deps.authorizer, deps.settlements, deps.metrics
    keys = workspace_keys(authorizer.names, key.workspace_id)
    entry, lease = decision.entry, int(policy.lease_ms)

    def release_key() -> None:
        settlements.queue(decision.settle_keys, entry, 0, lease)

    try:
        reply = await authorizer.redis.run_script(
            WORKSPACE_RESERVE,
            keys[:4],
            (authorizer.clock(), decision.held_micro, entry, policy.lease_ms, policy.on_expiry),
            _abandoned(deps, keys, entry, lease),
        )
    except asyncio.CancelledError:  # the client left: the service settles nothing for it
        release_key()
        raise
    except STORE_ERRORS as exc:
        metrics.redis_errors.labels("workspace").inc()
        # The script may have run (its reply lost with the connection): its entry, if it
        # was written, is settled at 0, as the key's is for an authorization whose reply
        # was lost; a request let through unchecked is not charged to the workspace.
        settlements.queue(keys, entry, 0, lease)
        if deps.settings.redis.on_error == "fail_open":
            metrics.fail_open.inc()
            return None
        release_key()
        deps.store_down.refused(exc)
        ctx.outcome = Outcome.STORE_ERROR
        return problem(
            Outcome.STORE_ERROR,
            "the key store is unavailable; retry shortly",
            error_format=ctx.error_format,
        )
    _count_expired(deps, reply)
    status = reply_text(reply[0])
    if status == "ok":
        ctx.workspace = WorkspaceHold(keys, entry)
        return None
    if status != "spend_limited":  # uncapped: the budget was removed; nothing written
        return None
    release_key()
    name, amount, period, counted, resets = reply[4:9]
    cap = BlockedCap(  # named workspace.spend_caps[i]
        reply_text(name), int(amount), reply_text(period), int(counted), int(resets) or None
    )
    return workspace_denied(ctx, cap, int(reply[1]), decision.held_micro)


def _abandoned(
    deps: StepDeps, keys: WorkspaceKeys, entry: str, lease: int
) -> Callable[[list[Any] | None], None]:
    """For a reply that arrives after its client left: the workspace's reservation (if it
    made one) is settled at 0; the key's was settled when the client left."""

    def handle(reply: list[Any] | None) -> None:
        if reply is None:  # sent, then the connection failed: it may have run
            deps.settlements.queue(keys, entry, 0, lease)
            return
        _count_expired(deps, reply)
        if reply_text(reply[0]) == "ok":
            deps.settlements.queue(keys, entry, 0, lease)

    return handle


def _count_expired(deps: StepDeps, reply: list[Any]) -> None:
    """The workspace's expired entries the script resolved, in the keys' same metric."""
    if int(reply[2]) or int(reply[3]):
        deps.authorizer.expired(int(reply[2]), int(reply[3]))


def workspace_denied(
    ctx: RequestContext, cap: BlockedCap, now_ms: int, reserved: int
) -> web.Response:
    """402 naming the workspace's cap, in the shape of a key's spend refusal: amount, used,
    what this request reserves, when it resets; Retry-After until then."""
    return respond(ctx, spend_refusal(cap, now_ms, reserved, whose="the workspace's"))
