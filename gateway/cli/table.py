"""Readable text output for the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_PERIOD_TITLES = {
    "daily": "daily (UTC)",
    "weekly": "weekly (UTC, ISO weeks)",
    "monthly": "monthly (UTC)",
}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def credits(value: float | None) -> str:
    """An amount as a person reads it: to the micro-unit, no trailing zeros (1.5, 4, 0)."""
    if value is None:
        return "-"
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _caps(row: dict[str, Any]) -> str:
    """Each spending cap as used/amount period, e.g. ``1.25/5 daily, 3/50 monthly``."""
    caps = [
        f"{credits(cap['used'])}/{credits(cap['amount'])} {cap['period']}" for cap in row["caps"]
    ]
    return ", ".join(caps) or "-"


# A listing's columns: (heading, the cell of a row).
_LIST_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("ID", lambda r: _cell(r["id"])),
    ("NAME", lambda r: _cell(r["name"])),
    ("LABEL", lambda r: _cell(r["label"])),
    ("WORKSPACE_ID", lambda r: _cell(r["workspace_id"])),
    ("SCOPES", lambda r: _cell(r["scopes"])),
    ("STATUS", lambda r: _cell(r["status"])),
    ("USAGE", lambda r: credits(r["usage"])),  # all time
    ("LIMIT", _caps),
    ("LAST_USED", lambda r: r["last_used_at"] or "never"),
    ("CREATED_AT", lambda r: _cell(r["created_at"])),
)


def _columns(cells: list[list[str]]) -> str:
    """Rows of cells, each column as wide as its widest cell, two spaces apart."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def listing(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no keys"
    header = [heading for heading, _ in _LIST_COLUMNS]
    return _columns([header] + [[cell(row) for _, cell in _LIST_COLUMNS] for row in rows])


def usage(periods: dict[str, list[dict[str, Any]]]) -> str:
    """Usage history (GET /v1/keys/{id}/usage's lists): one table per period, oldest
    first, the current period last."""
    tables = []
    for period, points in periods.items():
        cells = [["PERIOD", "USAGE", "BYOK_USAGE"]] + [
            [p["period"], credits(p["usage"]), credits(p["byok_usage"])] for p in points
        ]
        tables.append(f"{_PERIOD_TITLES[period]}\n{_columns(cells)}")
    return "\n\n".join(tables)


def record(data: dict[str, Any]) -> str:
    width = max(len(k) for k in data)
    return "\n".join(f"{key.ljust(width)}  {_cell(value)}" for key, value in data.items())
