"""Readable text output for the CLI."""

from __future__ import annotations

from typing import Any

_LIST_COLUMNS = ("id", "name", "label", "workspace_id", "scopes", "status", "created_at")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def listing(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no keys"
    cells = [[c.upper() for c in _LIST_COLUMNS]] + [
        [_cell(r[c]) for c in _LIST_COLUMNS] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_LIST_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def record(data: dict[str, Any]) -> str:
    width = max(len(k) for k in data)
    return "\n".join(f"{key.ljust(width)}  {_cell(value)}" for key, value in data.items())
