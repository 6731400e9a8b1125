"""``keygate keys ...``: key management straight on the store, so the first admin key
needs no key. Options become the same JSON fields the HTTP API validates."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from gateway import runtime
from gateway.store import input as key_input
from gateway.store.connection import describe
from gateway.store.keystore import BadCursor, Issued, KeyExists, KeyStore
from gateway.store.record import KEY_TYPES, KeyRecord

from . import table


class CommandError(Exception):
    """A failure to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _field_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    parser.add_argument("--name")
    if not update:
        parser.add_argument(
            "--workspace", dest="workspace_id", help="workspace (default: admin.default_workspace)"
        )
        parser.add_argument("--user-id", help="owner's UUID (default: a new one)")
    parser.add_argument("--team-name")
    parser.add_argument("--type", choices=KEY_TYPES)
    parser.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        metavar="SCOPE",
        help="grant a scope (repeat); e.g. apikeys:* or '*'",
    )
    parser.add_argument(
        "--resource",
        dest="resources",
        action="append",
        metavar="ID",
        help="allow only these resources, e.g. model ids (repeat)",
    )
    parser.add_argument("--expires-at", help="RFC 3339, e.g. 2027-01-31T00:00:00Z")
    parser.add_argument("--limit", type=float, help="spending limit in credits")
    parser.add_argument("--limit-reset", choices=("daily", "weekly", "monthly"))
    parser.add_argument(
        "--spend-cap",
        dest="spend_caps",
        action="append",
        metavar="AMOUNT/PERIOD",
        help="a further cap, all must hold: e.g. 50/monthly (repeat; replaces the list)",
    )
    byok = parser.add_mutually_exclusive_group()
    byok.add_argument(
        "--include-byok-in-limit", dest="include_byok_in_limit", action="store_const", const=True
    )
    byok.add_argument(
        "--exclude-byok-from-limit", dest="include_byok_in_limit", action="store_const", const=False
    )
    parser.add_argument("--rate-limit", metavar="N/SECONDS", help="e.g. 100/60")
    parser.add_argument("--metadata", action="append", metavar="K=V", help="(repeat)")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True)
    state.add_argument("--enable", dest="disabled", action="store_const", const=False)
    if update:
        parser.add_argument(
            "--clear",
            action="append",
            default=[],
            metavar="FIELD",
            help="set a nullable field to null: name, team_name, resources, "
            "expires_at, limit, limit_reset, rate_limit (repeat)",
        )


def _body(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON body the HTTP API would receive for these options."""
    body: dict[str, Any] = {}
    for name in (
        "name",
        "workspace_id",
        "user_id",
        "team_name",
        "type",
        "scopes",
        "resources",
        "expires_at",
        "limit",
        "limit_reset",
        "include_byok_in_limit",
        "disabled",
    ):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    if args.rate_limit is not None:
        requests, _, seconds = args.rate_limit.partition("/")
        try:
            body["rate_limit"] = {"requests": int(requests), "period_seconds": float(seconds)}
        except ValueError:
            raise CommandError("--rate-limit: expected N/SECONDS, e.g. 100/60", 2) from None
    if args.spend_caps:
        caps = []
        for cap in args.spend_caps:
            amount, _, period = cap.partition("/")
            try:
                caps.append({"amount": float(amount), "period": period})
            except ValueError:
                message = "--spend-cap: expected AMOUNT/PERIOD, e.g. 50/monthly"
                raise CommandError(message, 2) from None
        body["spend_caps"] = caps
    if args.metadata:
        pairs = [item.partition("=") for item in args.metadata]
        if any(not sep for _, sep, _ in pairs):
            raise CommandError("--metadata: expected KEY=VALUE", 2)
        body["metadata"] = {k: v for k, _, v in pairs}
    for name in getattr(args, "clear", []):
        body[name] = None
    return body


def _validate(body: dict[str, Any], mode: key_input.Mode) -> dict[str, Any]:
    try:
        return key_input.parse(body, mode, int(time.time() * 1000))
    except key_input.InvalidInput as exc:
        raise CommandError(
            "\n".join(f"{field}: {message}" for field, message in exc.errors), 2
        ) from None


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    output = argparse.ArgumentParser(add_help=False, parents=[common])
    output.add_argument("--json", action="store_true", help="machine-readable output")

    create = group.add_parser(
        "create", parents=[output], help="create a key; prints its secret once"
    )
    _field_options(create, update=False)
    create.set_defaults(run=_create, mode="create")

    imported = group.add_parser("import", parents=[output], help="adopt an existing secret")
    source = imported.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", help="the secret; '-' reads it from standard input")
    source.add_argument("--sha256", help="only the secret's sha256 (hex)")
    _field_options(imported, update=False)
    imported.set_defaults(run=_create, mode="import")

    listing = group.add_parser("list", parents=[output], help="list keys")
    listing.add_argument("--workspace", help="one workspace (default: every workspace)")
    listing.add_argument("--user-id")
    listing.add_argument("--include-disabled", action="store_true")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--cursor")
    listing.set_defaults(run=_list)

    show = group.add_parser("show", parents=[output], help="show one key")
    show.add_argument("key_id", metavar="ID")
    show.set_defaults(run=_show)

    update = group.add_parser("update", parents=[output], help="change only the given fields")
    update.add_argument("key_id", metavar="ID")
    _field_options(update, update=True)
    update.set_defaults(run=_update)

    revoke = group.add_parser("revoke", parents=[output], help="revoke a key everywhere")
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(run=_revoke)

    rotate = group.add_parser(
        "rotate", parents=[output], help="new secret, same id; prints it once"
    )
    rotate.add_argument("key_id", metavar="ID")
    rotate.add_argument(
        "--grace-seconds",
        type=float,
        default=0.0,
        help="how long the old secret keeps working (default 0)",
    )
    rotate.set_defaults(run=_rotate)


def _run(args: argparse.Namespace, action: Any) -> int:
    """Open the store (attaching to a running keygate's embedded server), run, print."""
    from gateway.cli import load_settings

    settings = load_settings(args.config)

    async def task(url: str) -> int:
        try:  # around open_store too: an unreachable server is one line, not a traceback
            async with runtime.open_store(settings, url) as store:
                return int(await action(store, settings))
        except (RedisError, RedisClusterException) as exc:
            raise CommandError(f"the key store failed: {describe(exc)}") from None

    try:
        return runtime.with_redis(settings, task, attach=True)
    except CommandError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        return exc.code


def _key_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise CommandError(f"no API key with id {raw!r}") from None


async def _print(
    args: argparse.Namespace, store: KeyStore, record: KeyRecord, secret: str | None = None
) -> None:
    """The record with its usage now (or as it was, if it vanished since)."""
    _, report = await store.report(record.id)
    data = report.to_json() if report else record.to_json(int(time.time() * 1000))
    if args.json:
        print(json.dumps({**data, "key": secret} if secret else data, indent=2))
        return
    print(table.record(data))
    if secret:
        print(f"\nsecret (shown once, store it now): {secret}")


def _create(args: argparse.Namespace) -> int:
    body = _body(args)
    if args.mode == "import":
        if args.key is not None:
            body["key"] = sys.stdin.readline().strip() if args.key == "-" else args.key
        else:
            body["sha256"] = args.sha256

    async def action(store: KeyStore, settings: Any) -> int:
        values = _validate(body, args.mode)
        values.setdefault("workspace_id", settings.admin.default_workspace)
        values.setdefault("user_id", str(uuid.uuid4()))
        secret, sha256 = values.pop("key", None), values.pop("sha256", None)
        try:
            issued: Issued = await store.create(values, secret=secret, sha256=sha256)
        except KeyExists as exc:
            raise CommandError(str(exc)) from None
        await _print(args, store, issued.record, issued.secret)
        return 0

    return _run(args, action)


def _list(args: argparse.Namespace) -> int:
    async def action(store: KeyStore, _settings: Any) -> int:
        if not 1 <= args.limit <= 1000:
            raise CommandError("--limit: must be from 1 to 1000", 2)
        try:
            page = await store.list(
                workspace_id=args.workspace,
                user_id=args.user_id,
                include_disabled=args.include_disabled,
                limit=args.limit,
                cursor=args.cursor,
            )
        except BadCursor as exc:
            raise CommandError(f"--cursor: {exc}", 2) from None
        reports = await store.reports([r.id for r in page.records])
        rows = [reports[r.id].to_json() for r in page.records if r.id in reports]
        if args.json:
            print(json.dumps({"data": rows, "next_cursor": page.next_cursor}, indent=2))
        else:
            print(table.listing(rows))
            if page.next_cursor:
                print(f"\nmore: --cursor {page.next_cursor}")
        return 0

    return _run(args, action)


def _show(args: argparse.Namespace) -> int:
    async def action(store: KeyStore, _settings: Any) -> int:
        record = await store.get(_key_id(args.key_id))
        if record is None:
            raise CommandError(f"no API key with id {args.key_id!r}")
        await _print(args, store, record)
        return 0

    return _run(args, action)


def _update(args: argparse.Namespace) -> int:
    body = _body(args)
    if not body:
        print("keygate: name at least one field to change", file=sys.stderr)
        return 2

    async def action(store: KeyStore, _settings: Any) -> int:
        values = _validate(body, "update")
        record = await store.update(_key_id(args.key_id), values)
        if record is None:
            raise CommandError(f"no API key with id {args.key_id!r}")
        await _print(args, store, record)
        return 0

    return _run(args, action)


def _revoke(args: argparse.Namespace) -> int:
    async def action(store: KeyStore, _settings: Any) -> int:
        if not await store.revoke(_key_id(args.key_id)):
            raise CommandError(f"no API key with id {args.key_id!r}")
        print(
            json.dumps({"id": args.key_id, "revoked": True})
            if args.json
            else f"revoked {args.key_id}"
        )
        return 0

    return _run(args, action)


def _rotate(args: argparse.Namespace) -> int:
    async def action(store: KeyStore, _settings: Any) -> int:
        if not 0 <= args.grace_seconds <= 30 * 86_400:
            raise CommandError("--grace-seconds: must be from 0 to 2592000", 2)
        issued = await store.rotate(_key_id(args.key_id), args.grace_seconds)
        if issued is None:
            raise CommandError(f"no API key with id {args.key_id!r}")
        await _print(args, store, issued.record, issued.secret)
        return 0

    return _run(args, action)
