"""Caps of keys minted by a key: never looser than the creator's remaining allowance
(docs/management-api.md, "Caps of minted keys").

For every period the creator caps (daily, weekly, monthly, total), the key it creates or
edits holds a cap of that period no larger than what the creator has left in it now:
a cap asked for above that is refused, naming its field; a period asked for with no cap
gets one equal to what is left. A creator holding ``apikeys:*`` (``*``, ``org:admin``) is
exempt, and a creator without caps imposes none. ``bound`` is pure; ``of_creator`` is the
one read it needs (the creator's report), shared by the admin API and the dialects.

The bound holds per key, at the moment of minting: N keys minted from one allowance may
together spend N times it. A workspace budget is what caps a group of keys in total.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.policies.scopes import ORG_ADMIN, grants
from gateway.store.record import MICRO, KeyRecord, SpendCap
from gateway.store.report import CapState

if TYPE_CHECKING:
    from gateway.store.keystore import KeyStore

PERIOD_ORDER = ("daily", "weekly", "monthly", "total")
# The stored fields that say how a key is capped; a change to none of them is not checked.
CAP_FIELDS = frozenset({"limit_micro", "limit_reset", "spend_caps", "include_byok_in_limit"})
MAX_SPEND_CAPS = 8  # as many as the management API accepts in spend_caps


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a creator may hand on: per period it caps, the least room left among its caps
    of that period (micro-units); and whether its caps count BYOK spend."""

    remaining_micro: Mapping[str, int]
    counts_byok: bool = False

    @classmethod
    def of(cls, caps: Iterable[CapState], include_byok_in_limit: bool) -> Allowance:
        """From the creator's report: its caps with their spend in the current period."""
        remaining: dict[str, int] = {}
        for cap in caps:
            left = cap.remaining_micro
            remaining[cap.period] = min(left, remaining.get(cap.period, left))
        return cls(remaining, include_byok_in_limit and bool(remaining))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A cap the creator cannot grant: ``field`` as the request names it (``limit``,
    ``spend_caps[1]``, ``include_byok_in_limit``), ``detail`` a sentence starting with it."""

    field: str
    detail: str
    period: str | None = None
    remaining_micro: int | None = None


def exempt(scopes: Iterable[str]) -> bool:
    """Whether a creator holding ``scopes`` may mint keys with any caps."""
    held = tuple(scopes)
    return grants(held, "apikeys:*") or grants(held, ORG_ADMIN)


async def of_creator(store: KeyStore, creator: KeyRecord) -> Allowance | None:
    """The allowance ``creator`` hands on now: empty when it is exempt; None when the key
    was revoked since it was authenticated."""
    if exempt(creator.scopes):
        return Allowance({})
    _, report = await store.report(creator.id)
    if report is None:
        return None
    return Allowance.of(report.caps, report.record.include_byok_in_limit)


def money(micro: int) -> str:
    """Micro-units as the exact decimal the API shows (``30000`` -> ``0.03``)."""
    whole, fraction = divmod(micro, MICRO)
    return f"{whole}.{fraction:06d}".rstrip("0").rstrip(".")


def _named(period: str) -> str:
    return "all-time" if period == "total" else period


def bound(
    allowance: Allowance, requested: Mapping[str, Any], held: KeyRecord | None = None
) -> dict[str, Any] | list[Refusal]:
    """The cap fields to write for a key minted (``held`` None) or edited (``held``, its
    record) by a creator with ``allowance``; or every refusal, in field order.

    ``requested`` holds the request's stored values (store/input.py's names: limit_micro,
    limit_reset, spend_caps, include_byok_in_limit; others are ignored). Only caps the
    request sets are checked: an edit that leaves a cap alone is never refused for it.
    The result holds the requested cap fields plus those inheritance adds: a period the
    creator caps and the key would not gets the creator's room in it, as ``limit`` when the
    request says nothing of the limit and the key has none, else as an extra spend cap.
    """
    changes = {name: value for name, value in requested.items() if name in CAP_FIELDS}
    remaining = allowance.remaining_micro
    if not remaining:
        return changes

    def current(name: str) -> Any:
        if name in changes:
            return changes[name]
        return None if held is None else getattr(held, name)

    limit, reset = current("limit_micro"), current("limit_reset")
    spend_caps: tuple[SpendCap, ...] = tuple(current("spend_caps") or ())
    asked_limit = "limit_micro" in changes or "limit_reset" in changes
    checked: list[tuple[str, int, str]] = []
    if asked_limit and limit is not None:
        checked.append(("limit", limit, reset or "total"))
    if "spend_caps" in changes:
        checked += [
            (f"spend_caps[{i}]", c.amount_micro, c.period) for i, c in enumerate(spend_caps)
        ]
    refusals = [
        Refusal(
            name,
            f"{name}: {money(amount)} {_named(period)} is above what the caller has left: "
            f"its remaining {_named(period)} allowance is {money(remaining[period])} (a key "
            "without apikeys:* mints keys only within its own caps)",
            period,
            remaining[period],
        )
        for name, amount, period in checked
        if period in remaining and amount > remaining[period]
    ]
    if allowance.counts_byok and not current("include_byok_in_limit"):
        if "include_byok_in_limit" in changes:
            refusals.append(
                Refusal(
                    "include_byok_in_limit",
                    "include_byok_in_limit: must be true: the caller's caps count BYOK usage, "
                    "so the caps of a key it mints must too",
                )
            )
        changes["include_byok_in_limit"] = True
    if refusals:
        return refusals

    covered = {c.period for c in spend_caps}
    if limit is not None:
        covered.add(reset or "total")
    missing = [p for p in PERIOD_ORDER if p in remaining and p not in covered]
    if missing and limit is None and not asked_limit:
        period = missing.pop(0)
        changes["limit_micro"] = remaining[period]
        changes["limit_reset"] = None if period == "total" else period
    if missing:
        inherited = tuple(SpendCap(remaining[p], p) for p in missing)
        if len(spend_caps) + len(inherited) > MAX_SPEND_CAPS:
            periods = ", ".join(missing)
            return [
                Refusal(
                    "spend_caps",
                    f"spend_caps: the caller's allowance adds a cap for {periods}, which "
                    f"would make more than {MAX_SPEND_CAPS}; give those periods a cap "
                    "within the allowance instead",
                )
            ]
        changes["spend_caps"] = spend_caps + inherited
    return changes
