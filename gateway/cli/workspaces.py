"""``keygate workspaces show|set``: workspace budgets straight on the store, as ``keygate
keys`` manages keys (the same config loading, errors in words or as problem documents
under ``--json``, exit status 2 for bad input, 1 for a store failure). The caps given
become the JSON body ``PUT /v1/workspaces/{id}`` validates, so both refuse alike."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.config import Settings
from gateway.store.input import WORKSPACE_PATTERN, InvalidInput
from gateway.store.keystore import KeyStore
from gateway.store.workspaces import USAGE_PERIODS, parse_budget, valid_workspace_id

from . import table
from .keys import CommandError, _guarded, _Parser, _run, models_table

SEPARATORS = (":", "/")  # AMOUNT:PERIOD; AMOUNT/PERIOD as `keygate keys --spend-cap` takes


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser(
        "workspaces", help="workspace budgets: spend caps across a workspace's keys"
    ).add_subparsers(
        dest="workspaces_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    output = argparse.ArgumentParser(add_help=False, parents=[common])
    output.add_argument("--json", action="store_true", help="machine-readable output")

    show = group.add_parser(
        "show", parents=[output], help="a workspace's caps, usage and requests in flight"
    )
    show.add_argument("workspace_id", metavar="ID", help="the workspace's id")
    show.set_defaults(run=_guarded(_show))

    put = group.add_parser("set", parents=[output], help="replace a workspace's spend caps")
    put.add_argument("workspace_id", metavar="ID", help="the workspace's id")
    caps = put.add_mutually_exclusive_group(required=True)
    caps.add_argument(
        "--spend-cap",
        dest="spend_caps",
        action="append",
        metavar="AMOUNT:PERIOD",
        help="a cap in credits, all must hold: e.g. 50:monthly; period daily, weekly, "
        "monthly or total (repeat; replaces the list)",
    )
    caps.add_argument(
        "--no-spend-caps",
        action="store_true",
        help="remove the workspace's caps (its keys stop reserving against it)",
    )
    put.set_defaults(run=_guarded(_set))


def _workspace(raw: str) -> str:
    if not valid_workspace_id(raw):
        detail = f"must match {WORKSPACE_PATTERN}"
        raise CommandError(
            f"workspace_id: {detail}", 2, "invalid_request", [("workspace_id", detail)]
        )
    return raw


def _cap(raw: str) -> dict[str, Any]:
    """``AMOUNT:PERIOD`` as the JSON cap the API takes; the API's rules judge the values."""
    for separator in SEPARATORS:
        amount, found, period = raw.partition(separator)
        if found:
            try:
                return {"amount": float(amount), "period": period}
            except ValueError:
                break
    message = f"--spend-cap: expected AMOUNT:PERIOD, e.g. 50:monthly (got {raw!r})"
    raise CommandError(message, 2, "invalid_request")


def _set(args: argparse.Namespace) -> int:
    workspace_id = _workspace(args.workspace_id)
    body = {"spend_caps": [] if args.no_spend_caps else [_cap(c) for c in args.spend_caps]}
    try:
        caps = parse_budget(body)
    except InvalidInput as exc:
        message = "\n".join(f"{field}: {text}" for field, text in exc.errors)
        raise CommandError(message, 2, "invalid_request", exc.errors) from None

    async def action(store: KeyStore, _settings: Settings) -> int:
        await store.workspaces.set_caps(workspace_id, caps)
        await _print(args, store, workspace_id)
        return 0

    return _run(args, action)


def _show(args: argparse.Namespace) -> int:
    workspace_id = _workspace(args.workspace_id)

    async def action(store: KeyStore, _settings: Settings) -> int:
        await _print(args, store, workspace_id)
        return 0

    return _run(args, action)


async def _print(args: argparse.Namespace, store: KeyStore, workspace_id: str) -> None:
    data = (await store.workspaces.get(workspace_id)).to_json()
    if args.json:
        print(json.dumps(data, indent=2))
        return
    caps = [
        f"{table.credits(c['used'])}/{table.credits(c['amount'])} {c['period']}"
        + (f" (resets {c['resets_at']})" if c["resets_at"] else "")
        for c in data["spend_caps"]
    ]
    usage = "  ".join(f"{p} {table.credits(data['usage'][p])}" for p in USAGE_PERIODS)
    rows = {
        "workspace_id": data["workspace_id"],
        "spend_caps": "; ".join(caps) or "none",
        "usage": usage,
        "in_flight": f"{data['in_flight']} (reserved {table.credits(data['reserved'])})",
        "updated_at": data["updated_at"] or "never",
    }
    print(table.record(rows))
    models = data["usage_by_model"]
    if any(models.values()):
        print(f"\n{models_table(models)}")
