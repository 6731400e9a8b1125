"""Workspace budgets: spend caps that hold across every key of a workspace.

A budget lives on the workspace's own slot (hash tag ``{w:<workspace_id>}``, names.py): a
hash with the caps, usage buckets and a reservation ledger in the same formats as a key's,
so settle.lua settles a workspace's ledger entry exactly as a key's. The proxy reserves
there after the key's own authorization (lua/workspace_reserve.lua), for keys whose record
carries ``workspace_capped = '1'``; this module sets that flag and reads and writes the caps.

Setting the flag exactly, without a lock: ``set_caps`` writes the caps, then walks the
workspace's key index and flags every record there; ``KeyStore.create`` writes the index
member and the record, then reads the caps and flags the new key if there are any. Each
side writes before it reads, so for any key created concurrently with a PUT, at least one
side sees the other's write: the key is flagged by the walk or by its own creation. The
flag is never cleared: a workspace whose caps were removed costs its keys one no-op
script per request (``uncapped``), and a later PUT needs no second walk to be exact.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from redis.commands.core import AsyncScript

from gateway.store.clock import ClockOverride
from gateway.store.connection import StoreClient
from gateway.store.input import MAX_MONEY, WORKSPACE_PATTERN, InvalidInput
from gateway.store.names import KeyNames
from gateway.store.record import MICRO, PERIODS, SpendCap, encode_fields, from_micro, rfc3339
from gateway.store.report import (
    MODEL_PERIODS,
    CapState,
    ModelsUsage,
    models_from_hash,
    models_json,
)
from gateway.store.scripts import script_source

MAX_CAPS = 8  # as many as a key may have (store/input.py)
CAP_PERIODS = (*PERIODS, "total")
USAGE_PERIODS = ("daily", "weekly", "monthly", "total")
_WORKSPACE = re.compile(WORKSPACE_PATTERN)
_BATCH = 500  # index members read per round trip while flagging
_CONCURRENT = 32  # flag scripts in flight at once (each on its key's slot)


def valid_workspace_id(workspace_id: str) -> bool:
    """Whether ``workspace_id`` is one a key may carry (store/input.py's pattern)."""
    return bool(_WORKSPACE.fullmatch(workspace_id))


def parse_budget(body: Mapping[str, Any]) -> tuple[SpendCap, ...]:
    """``{"spend_caps": [{"amount": credits, "period": ...}, ...]}`` -> caps in micro-units.

    Amounts are credits > 0 (at least one micro-unit once rounded); periods daily, weekly,
    monthly or total; at most MAX_CAPS caps; an empty list removes the budget. Raises
    InvalidInput naming each bad field, e.g. ``spend_caps[1].period``."""
    errors: list[tuple[str, str]] = [
        (name, "unknown field") for name in body if name != "spend_caps"
    ]
    raw = body.get("spend_caps")
    if "spend_caps" not in body:
        errors.append(("spend_caps", "is required (an empty list removes the budget)"))
    elif not isinstance(raw, list):
        errors.append(("spend_caps", "must be a list of {amount, period}"))
    elif len(raw) > MAX_CAPS:
        errors.append(("spend_caps", f"must have at most {MAX_CAPS} caps"))
    caps: list[SpendCap] = []
    for i, cap in enumerate(raw if isinstance(raw, list) and len(raw) <= MAX_CAPS else []):
        field = f"spend_caps[{i}]"
        if not isinstance(cap, dict):
            errors.append((field, "must be an object with amount and period"))
            continue
        errors += [
            (f"{field}.{name}", "unknown field") for name in cap if name not in ("amount", "period")
        ]
        period = cap.get("period")
        if period not in CAP_PERIODS:
            errors.append((f"{field}.period", f"must be one of {', '.join(CAP_PERIODS)}"))
        amount, problem = _amount(cap.get("amount"))
        if problem:
            errors.append((f"{field}.amount", problem))
        caps.append(SpendCap(amount, str(period)))
    if errors:
        raise InvalidInput(errors)
    return tuple(caps)


def _amount(value: Any) -> tuple[int, str]:
    """Credits -> (micro-units, ""), or (0, what is wrong)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0, "must be a number of credits"
    if not math.isfinite(value) or value > MAX_MONEY:
        return 0, f"must be at most {MAX_MONEY}"
    micro = round(value * MICRO)
    if micro < 1:
        return 0, "must be greater than 0 (at least 0.000001)"
    return micro, ""


@dataclass(frozen=True, slots=True)
class WorkspaceBudget:
    """A workspace's budget now, as workspace_report.lua reads it in one call."""

    workspace_id: str
    now_ms: int
    caps: tuple[CapState, ...]  # named workspace.spend_caps[i], with counted spend and reset
    usage_micro: dict[str, int]  # daily, weekly, monthly, total (spend while capped)
    in_flight: int  # pending ledger entries whose lease has not ended
    reserved_micro: int  # what they hold
    updated_at_ms: int | None  # when the caps were last set; None: never
    models: dict[str, ModelsUsage]  # daily, weekly, monthly: usage per model (while capped)

    def to_json(self) -> dict[str, Any]:
        """The public view (GET /v1/workspaces/{id}, keygate workspaces show --json)."""
        return {
            "workspace_id": self.workspace_id,
            "spend_caps": [cap.to_json() for cap in self.caps],
            "usage": {period: from_micro(self.usage_micro[period]) for period in USAGE_PERIODS},
            "in_flight": self.in_flight,
            "reserved": from_micro(self.reserved_micro),
            "usage_by_model": {p: models_json(self.models[p]) for p in MODEL_PERIODS},
            "updated_at": rfc3339(self.updated_at_ms),
            "now": rfc3339(self.now_ms),
        }


class Workspaces:
    """Reads and writes of workspace budgets, and the keys' ``workspace_capped`` flag."""

    def __init__(self, client: StoreClient, names: KeyNames, clock: ClockOverride) -> None:
        self.client = client
        self.names = names
        self.clock = clock  # '' (the server's TIME) except in tests of period rollover
        self._report: AsyncScript = client.register_script(script_source("workspace_report"))
        self._flag: AsyncScript = client.register_script(script_source("workspace_flag"))

    async def set_caps(self, workspace_id: str, caps: tuple[SpendCap, ...]) -> int:
        """Replace the workspace's caps (an empty tuple removes them), then flag every key
        already in the workspace (see the module doc for why this order is exact). The hash
        stays once written, caps or not: settle.lua settles nothing without it, and
        requests in flight must still settle. Returns how many keys were flagged."""
        seconds, micros = await self.client.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        encoded = _encode(caps)
        await self.client.hset(
            self.names.workspace_budget(workspace_id),
            mapping={"spend_caps": encoded, "updated_at": str(now)},
        )
        if not caps:
            return 0  # nothing to enforce: keys flagged earlier stay flagged (a no-op)
        return await self._flag_index(workspace_id)

    async def capped(self, workspace_id: str) -> bool:
        """Whether the workspace has at least one cap now."""
        raw = await self.client.hget(self.names.workspace_budget(workspace_id), "spend_caps")
        return raw is not None and _text(raw) not in ("", "[]")

    async def flag_if_capped(self, workspace_id: str, key_id: str) -> bool:
        """For a key just created (index member and record written): flag it when its
        workspace has caps. Returns whether it was flagged."""
        if not await self.capped(workspace_id):
            return False
        return bool(await self._flag(keys=[self.names.record(key_id)], args=[]))

    async def _flag_index(self, workspace_id: str) -> int:
        """Flag every key listed in the workspace's index; members whose record is gone
        (revoked, or created and failed) are left alone by the script."""
        index = self.names.workspace_index(workspace_id)
        start, flagged = "-", 0
        while True:
            members = cast(
                list[Any], await self.client.zrangebylex(index, start, "+", start=0, num=_BATCH)
            )
            if not members:
                return flagged
            ids = [_text(member).split(":", 1)[1] for member in members]
            for at in range(0, len(ids), _CONCURRENT):
                replies = await asyncio.gather(
                    *(
                        self._flag(keys=[self.names.record(key_id)], args=[])
                        for key_id in ids[at : at + _CONCURRENT]
                    )
                )
                flagged += sum(int(reply) for reply in replies)
            start = f"({_text(members[-1])}"

    async def get(self, workspace_id: str) -> WorkspaceBudget:
        """The budget now: caps with used/remaining/reset, usage per period and per model,
        requests in flight. A workspace that never had a budget shows no caps and zero
        usage."""
        names = self.names
        reply = await self._report(
            keys=[
                names.workspace_budget(workspace_id),
                names.workspace_usage(workspace_id, ""),
                names.workspace_ledger_entries(workspace_id),
            ],
            args=[self.clock()],
        )
        flat = [_text(value) for value in reply[2]]
        caps = tuple(
            CapState(
                name=flat[i],
                amount_micro=int(flat[i + 1]),
                period=flat[i + 2],
                counted_micro=int(flat[i + 3]),
                resets_at_ms=int(flat[i + 4]) or None,
            )
            for i in range(0, len(flat), 5)
        )
        usage = [int(value) for value in reply[1]]
        updated = reply[5]
        return WorkspaceBudget(
            workspace_id=workspace_id,
            now_ms=int(reply[0]),
            caps=caps,
            usage_micro=dict(zip(USAGE_PERIODS, usage, strict=True)),
            in_flight=int(reply[3]),
            reserved_micro=int(reply[4]),
            updated_at_ms=None if updated is None else int(_text(updated)),
            models=dict(zip(MODEL_PERIODS, (models_from_hash(m) for m in reply[6]), strict=True)),
        )


def _encode(caps: tuple[SpendCap, ...]) -> str:
    """The caps as lib.lua's caps_of reads them, as a key's: [[amount_micro, period], ...]."""
    return encode_fields({"spend_caps": caps})["spend_caps"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
