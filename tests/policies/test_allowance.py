"""The rule for caps of minted keys, as a pure function: given the creator's caps with
what is left in each and the caps asked for, the key's caps or the refusals."""

from __future__ import annotations

import pytest

from gateway.policies.allowance import Allowance, Refusal, bound, exempt, money
from gateway.store.record import KeyRecord, SpendCap
from gateway.store.report import CapState

DAY = Allowance({"daily": 30_000})  # 0.03 left today


def cap(name: str, amount: int, period: str, used: int) -> CapState:
    return CapState(name, amount, period, used, None)


def record(**caps: object) -> KeyRecord:
    return KeyRecord(
        id="k",
        hash="h",
        prefix="p",
        label="l",
        user_id="u",
        workspace_id="w",
        created_at=0,
        updated_at=0,
        **caps,  # type: ignore[arg-type]
    )


def test_the_allowance_is_the_least_room_per_period() -> None:
    caps = [
        cap("limit", 50_000, "daily", 20_000),
        cap("spend_caps[0]", 40_000, "daily", 20_000),
        cap("spend_caps[1]", 100_000, "total", 120_000),  # over: nothing left, not below 0
    ]
    found = Allowance.of(caps, include_byok_in_limit=True)
    assert found.remaining_micro == {"daily": 20_000, "total": 0}
    assert found.counts_byok is True
    assert Allowance.of([], include_byok_in_limit=True).counts_byok is False


def test_no_cap_asked_inherits_each_period_the_first_as_limit() -> None:
    room = Allowance({"total": 5, "weekly": 7, "daily": 3})
    assert bound(room, {}) == {
        "limit_micro": 3,
        "limit_reset": "daily",
        "spend_caps": (SpendCap(7, "weekly"), SpendCap(5, "total")),
    }


def test_a_cap_at_the_allowance_is_kept_and_covers_its_period() -> None:
    asked = {"limit_micro": 30_000, "limit_reset": "daily"}
    assert bound(DAY, asked) == asked
    asked_caps = {"spend_caps": (SpendCap(10, "daily"), SpendCap(10**9, "monthly"))}
    assert bound(DAY, asked_caps) == asked_caps  # months are not the creator's to bound


def test_a_looser_cap_is_refused_naming_its_field() -> None:
    asked = {
        "limit_micro": 30_001,
        "limit_reset": "daily",
        "spend_caps": (SpendCap(1, "daily"), SpendCap(500_000, "daily")),
    }
    found = bound(DAY, asked)
    assert isinstance(found, list)
    assert [r.field for r in found] == ["limit", "spend_caps[1]"]
    assert found[0] == Refusal(
        "limit",
        "limit: 0.030001 daily is above what the caller has left: its remaining daily "
        "allowance is 0.03 (a key without apikeys:* mints keys only within its own caps)",
        "daily",
        30_000,
    )


def test_a_limit_without_reset_is_an_all_time_cap() -> None:
    room = Allowance({"total": 100})
    found = bound(room, {"limit_micro": 101})
    assert isinstance(found, list) and found[0].field == "limit" and found[0].period == "total"
    assert "all-time" in found[0].detail


def test_a_creator_without_caps_imposes_nothing() -> None:
    asked = {"limit_micro": 10**15, "include_byok_in_limit": False, "name": "x"}
    assert bound(Allowance({}), asked) == {"limit_micro": 10**15, "include_byok_in_limit": False}


def test_inherited_caps_go_to_spend_caps_when_the_limit_was_asked_about() -> None:
    assert bound(DAY, {"limit_micro": None, "limit_reset": None}) == {
        "limit_micro": None,
        "limit_reset": None,
        "spend_caps": (SpendCap(30_000, "daily"),),
    }


def test_more_than_eight_spend_caps_is_refused() -> None:
    asked = {"limit_micro": 1, "spend_caps": tuple(SpendCap(1, "monthly") for _ in range(8))}
    found = bound(Allowance({"daily": 5, "weekly": 5}), asked)
    assert isinstance(found, list) and [r.field for r in found] == ["spend_caps"]


def test_byok_counting_is_inherited_and_dropping_it_refused() -> None:
    room = Allowance({"daily": 5}, counts_byok=True)
    assert bound(room, {})["include_byok_in_limit"] is True  # type: ignore[call-overload]
    found = bound(room, {"include_byok_in_limit": False})
    assert isinstance(found, list) and found[0].field == "include_byok_in_limit"


def test_an_edit_checks_only_what_it_sets() -> None:
    held = record(limit_micro=10**9, limit_reset="daily", spend_caps=(SpendCap(1, "weekly"),))
    room = Allowance({"daily": 30_000, "weekly": 2})
    assert bound(room, {"spend_caps": (SpendCap(2, "weekly"),)}, held) == {
        "spend_caps": (SpendCap(2, "weekly"),)  # the loose limit was there before
    }
    found = bound(room, {"limit_reset": "weekly"}, held)  # re-periods the held limit
    assert isinstance(found, list) and found[0].field == "limit"
    # Dropping the daily limit leaves the day's room as an extra cap.
    assert bound(room, {"limit_micro": None}, held) == {
        "limit_micro": None,
        "spend_caps": (SpendCap(1, "weekly"), SpendCap(30_000, "daily")),
    }


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        (["apikeys:*"], True),
        (["*"], True),
        (["org:admin"], True),
        (["org:*"], True),
        (["apikeys:create", "apikeys:update"], False),
        ([], False),
    ],
)
def test_who_is_exempt(scopes: list[str], expected: bool) -> None:
    assert exempt(scopes) is expected


def test_money_is_exact() -> None:
    assert [money(m) for m in (0, 30_000, 1_000_000, 1_234_567, 10**15)] == [
        "0",
        "0.03",
        "1",
        "1.234567",
        "1000000000",
    ]
