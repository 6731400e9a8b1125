"""``keygate keys ...``: key management straight on the store, so the first admin key
needs no key. Options become the same JSON fields the HTTP API validates.

Errors are one ``keygate: ...`` line on stderr. With ``--json`` they are the admin API's
RFC 9457 problem document on stdout instead: under ``--json`` stdout always holds exactly
one JSON document, the result or the problem, and the exit status says which.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

from redis.exceptions import RedisClusterException, RedisError

from gateway import runtime
from gateway.config import ConfigError, Settings
from gateway.embedded import EmbeddedError
from gateway.policies.scopes import grants
from gateway.store import input as key_input
from gateway.store.connection import describe
from gateway.store.keystore import BadCursor, Issued, KeyExists, KeyStore
from gateway.store.record import KEY_TYPES, KeyRecord, Status, from_micro
from gateway.usage import history
from gateway.usage.periods import PERIODS

from . import table

Action = Callable[[KeyStore, Settings], Awaitable[int]]
# The admin API's problem codes and the status it answers with; the CLI-only ones have none.
_PROBLEMS: dict[str, tuple[str, int | None]] = {
    "invalid_request": ("Invalid request", 400),
    "not_found": ("Not found", 404),
    "conflict": ("Conflict", 409),
    "store_error": ("Key store unavailable", 503),
    "invalid_config": ("Invalid configuration", None),
    "not_confirmed": ("Not confirmed", None),
}
STATUSES: tuple[Status, ...] = ("active", "disabled", "expired")


class CommandError(Exception):
    """A failure to report: ``code`` is the exit status, ``problem`` the admin API's error
    code for it, ``errors`` the (field, message) pairs of invalid input."""

    def __init__(
        self,
        message: str,
        code: int = 1,
        problem: str = "not_found",
        errors: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.problem = problem
        self.errors = list(errors)

    def document(self) -> dict[str, Any]:
        """The RFC 9457 problem document, as the admin API shapes one."""
        title, status = _PROBLEMS[self.problem]
        body: dict[str, Any] = {"type": f"urn:keygate:error:{self.problem}", "title": title}
        if status is not None:
            body["status"] = status
        body["detail"] = str(self).splitlines()[0]
        body["code"] = self.problem
        if self.errors:
            body["errors"] = [{"field": f, "detail": m} for f, m in self.errors]
        return body


def _invalid(message: str) -> CommandError:
    """Bad input on the command line: exit status 2, as argparse's own errors."""
    return CommandError(message, 2, "invalid_request")


def _no_key(raw: str) -> CommandError:
    return CommandError(f"no API key with id {raw!r}")


def _fail(wants_json: bool, error: CommandError) -> int:
    if wants_json:
        print(json.dumps(error.document()))
    else:
        print(f"keygate: {error}", file=sys.stderr)
    return error.code


class _Parser(argparse.ArgumentParser):
    """A ``keys`` subcommand's parser: with ``--json`` among its arguments, its usage errors
    are problem documents too (exit status 2, as argparse's). Arguments it does not know
    are its error, not the top-level parser's, so they are reported the same way."""

    wants_json = False

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        given = list(args[0] if args else kwargs.get("args") or ())
        self.wants_json = "--json" in (given[: given.index("--")] if "--" in given else given)
        parsed, extras = super().parse_known_args(*args, **kwargs)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        if self.wants_json:
            sys.exit(_fail(True, _invalid(f"{message} (see {self.prog} --help)")))
        super().error(message)


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run``, with every failure reported as one line, or as a problem under --json."""

    def guarded(args: argparse.Namespace) -> int:
        wants_json = bool(getattr(args, "json", False))
        try:
            return run(args)
        except CommandError as exc:
            return _fail(wants_json, exc)
        except ConfigError as exc:
            if not wants_json:
                raise  # the caller prints one line per problem
            pairs = [line.partition(": ")[::2] for line in exc.problems]
            return _fail(True, CommandError(exc.problems[0], 2, "invalid_config", pairs))
        except EmbeddedError as exc:
            if not wants_json:
                raise
            return _fail(True, CommandError(str(exc), 1, "store_error"))

    return guarded


# --- options ---------------------------------------------------------------------------------


def _field_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    parser.add_argument(
        "--name", help="display name" + (" (--clear name removes it)" if update else "")
    )
    if not update:
        parser.add_argument(
            "--workspace", dest="workspace_id", help="workspace (default: admin.default_workspace)"
        )
        parser.add_argument("--user-id", help="owner's UUID (default: a new one)")
    parser.add_argument("--team-name", help="team shown by the Baseten dialect")
    parser.add_argument(
        "--type", choices=KEY_TYPES, help="key type, Baseten's enum (default PERSONAL)"
    )
    parser.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        metavar="SCOPE",
        help="replace all of the key's scopes with these (repeat); to change some, use "
        "--add-scope and --remove-scope"
        if update
        else "grant a scope (repeat); e.g. chat:invoke, apikeys:* or '*'",
    )
    parser.add_argument(
        "--resource",
        dest="resources",
        action="append",
        metavar="ID",
        help="replace the key's resource allow-list with these (repeat); --clear resources "
        "allows any"
        if update
        else "allow only these resources, e.g. model ids (repeat; default: any)",
    )
    if update:
        parser.add_argument(
            "--add-scope",
            dest="add_scopes",
            action="append",
            default=[],
            metavar="SCOPE",
            help="grant one more scope, keeping the others (repeat)",
        )
        parser.add_argument(
            "--remove-scope",
            dest="remove_scopes",
            action="append",
            default=[],
            metavar="SCOPE",
            help="take away a scope the key holds, keeping the others (repeat)",
        )
        parser.add_argument(
            "--add-resource",
            dest="add_resources",
            action="append",
            default=[],
            metavar="ID",
            help="allow one more resource on a key limited to a list (repeat)",
        )
        parser.add_argument(
            "--remove-resource",
            dest="remove_resources",
            action="append",
            default=[],
            metavar="ID",
            help="take a resource off the key's allow-list (repeat)",
        )
    parser.add_argument("--expires-at", help="RFC 3339, e.g. 2027-01-31T00:00:00Z")
    parser.add_argument(
        "--limit", type=float, help="spending limit in credits, per --limit-reset period"
    )
    parser.add_argument(
        "--limit-reset",
        choices=("daily", "weekly", "monthly"),
        help="when the limit starts afresh, in UTC (default: never)",
    )
    parser.add_argument(
        "--spend-cap",
        dest="spend_caps",
        action="append",
        metavar="AMOUNT/PERIOD",
        help="a further cap, all must hold: e.g. 50/monthly (repeat"
        + ("; replaces the list)" if update else ")"),
    )
    byok = parser.add_mutually_exclusive_group()
    byok.add_argument(
        "--include-byok-in-limit",
        dest="include_byok_in_limit",
        action="store_const",
        const=True,
        help="count BYOK usage against the limit and caps",
    )
    byok.add_argument(
        "--exclude-byok-from-limit",
        dest="include_byok_in_limit",
        action="store_const",
        const=False,
        help="do not count BYOK usage against them (a new key's default)",
    )
    parser.add_argument(
        "--rate-limit", metavar="N/SECONDS", help="this key's rate limit, e.g. 100/60"
    )
    parser.add_argument(
        "--max-in-flight",
        metavar="N",
        help="requests of this key in flight at once, on every replica together (429 "
        "concurrency_limited beyond); 0 or none: no limit",
    )
    parser.add_argument(
        "--token-limit",
        dest="token_limits",
        action="append",
        metavar="N/SECONDS",
        help="LLM tokens (input plus output) per window, e.g. 100000/60 (repeat"
        + ("; replaces the list; 0 clears it)" if update else ")"),
    )
    parser.add_argument(
        "--metadata",
        action="append",
        metavar="K=V",
        help="replace all metadata with these pairs (repeat)"
        if update
        else "a free-form pair (repeat)",
    )
    state = parser.add_mutually_exclusive_group()
    state.add_argument(
        "--disable",
        dest="disabled",
        action="store_const",
        const=True,
        help="refuse the key (403) until it is enabled",
    )
    state.add_argument(
        "--enable",
        dest="disabled",
        action="store_const",
        const=False,
        help="accept a disabled key again",
    )
    if update:
        parser.add_argument(
            "--clear",
            action="append",
            default=[],
            metavar="FIELD",
            help="set a nullable field to null: name, team_name, resources, "
            "expires_at, limit, limit_reset, rate_limit, max_in_flight (repeat)",
        )


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    output = argparse.ArgumentParser(add_help=False, parents=[common])
    output.add_argument("--json", action="store_true", help="machine-readable output")

    def command(name: str, run: Callable[[argparse.Namespace], int], **options: Any) -> Any:
        parser = group.add_parser(name, parents=[output], **options)
        parser.set_defaults(run=_guarded(run))
        return parser

    def key_id(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("key_id", metavar="ID", help="the key's id")

    create = command("create", _create, help="create a key; prints its secret once")
    _field_options(create, update=False)
    create.set_defaults(mode="create")

    imported = command("import", _create, help="adopt an existing secret")
    source = imported.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--key",
        help="the secret, 16-512 visible ASCII characters; '-' reads it from standard input",
    )
    source.add_argument("--sha256", help="only the secret's sha256 (hex)")
    _field_options(imported, update=False)
    imported.set_defaults(mode="import")

    listing = command("list", _list, help="list keys with their usage, limit and last use")
    listing.add_argument("--workspace", help="one workspace (default: every workspace)")
    listing.add_argument("--user-id", help="only this owner's keys")
    listing.add_argument("--name", help="only keys whose name contains this, in any case")
    listing.add_argument(
        "--status", choices=STATUSES, help="only keys in this state (disabled ones included)"
    )
    listing.add_argument("--include-disabled", action="store_true", help="list disabled keys too")
    listing.add_argument(
        "--limit", type=int, default=100, help="keys per page, 1 to 1000 (default 100)"
    )
    listing.add_argument("--cursor", help="the next page: the cursor a page ends with")

    show = command("show", _show, help="show one key")
    key_id(show)

    update = command("update", _update, help="change only the given fields")
    key_id(update)
    _field_options(update, update=True)

    usage = command("usage", _usage, help="usage per day, ISO week and month (UTC)")
    key_id(usage)
    usage.add_argument("--period", choices=PERIODS, help="only this period (default: all)")

    revoke = command("revoke", _revoke, help="revoke a key everywhere")
    key_id(revoke)
    revoke.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="do not ask for confirmation (asked only when standard input is a terminal)",
    )

    rotate = command("rotate", _rotate, help="new secret, same id; prints it once")
    key_id(rotate)
    rotate.add_argument(
        "--grace-seconds",
        type=float,
        default=0.0,
        help="how long the old secret keeps working (default 0)",
    )


# --- running against the store ---------------------------------------------------------------


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
            raise _invalid("--rate-limit: expected N/SECONDS, e.g. 100/60") from None
    if args.max_in_flight is not None:
        body["max_in_flight"] = _max_in_flight(args.max_in_flight)
    if args.spend_caps:
        caps = []
        for cap in args.spend_caps:
            amount, _, period = cap.partition("/")
            try:
                caps.append({"amount": float(amount), "period": period})
            except ValueError:
                raise _invalid("--spend-cap: expected AMOUNT/PERIOD, e.g. 50/monthly") from None
        body["spend_caps"] = caps
    if args.token_limits:
        body["token_limits"] = _token_limits(args.token_limits)
    if args.metadata:
        pairs = [item.partition("=") for item in args.metadata]
        if any(not sep for _, sep, _ in pairs):
            raise _invalid("--metadata: expected KEY=VALUE")
        body["metadata"] = {k: v for k, _, v in pairs}
    for name in getattr(args, "clear", []):
        body[name] = None
    return body


def _token_limits(raw: list[str]) -> list[dict[str, Any]]:
    """--token-limit's values as the API takes them; a lone 0 clears the list."""
    if raw == ["0"]:
        return []
    limits = []
    for item in raw:
        tokens, _, seconds = item.partition("/")
        try:
            limits.append({"tokens": int(tokens), "period_seconds": float(seconds)})
        except ValueError:
            raise _invalid(
                f"--token-limit: expected N/SECONDS, e.g. 100000/60, got {item!r}"
            ) from None
    return limits


def _max_in_flight(raw: str) -> int | None:
    """--max-in-flight's value as the API takes it: 0 or none clear the limit (null); any
    other integer is checked by the API's own rule, so -1 is refused naming the field."""
    text = raw.strip().lower()
    if text in ("0", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise _invalid(
            f"--max-in-flight: expected a whole number (0 or none: no limit), got {raw!r}"
        ) from None


def _validate(
    body: dict[str, Any], mode: key_input.Mode, secret_prefix: str | None = None
) -> dict[str, Any]:
    try:
        return key_input.parse(body, mode, int(time.time() * 1000), secret_prefix=secret_prefix)
    except key_input.InvalidInput as exc:
        message = "\n".join(f"{field}: {message}" for field, message in exc.errors)
        raise CommandError(message, 2, "invalid_request", exc.errors) from None


def _run(args: argparse.Namespace, action: Action) -> int:
    """Say which config and key store this is (on stderr: stdout holds only the result),
    open the store (attaching to a running keygate's embedded server), run, print."""
    from .source import load_config

    loaded = load_config(args.config)
    settings = loaded.settings
    print(f"keygate: {loaded.summary()}", file=sys.stderr, flush=True)

    async def task(url: str) -> int:
        try:  # around open_store too: an unreachable server is one line, not a traceback
            async with runtime.open_store(settings, url, strict=True) as store:
                return await action(store, settings)
        except (RedisError, RedisClusterException) as exc:
            message = f"the key store failed: {describe(exc, settings.redis, url)}"
            raise CommandError(message, 1, "store_error") from None

    return runtime.with_redis(settings, task, attach=True)


def _key_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise _no_key(raw) from None


async def _now_ms(store: KeyStore) -> int:
    """The store's clock, as the scripts see it (a test's fixed clock when one is set)."""
    override = store.clock()
    return int(override) if override else await store.server_time_ms()


async def _print(
    args: argparse.Namespace,
    store: KeyStore,
    record: KeyRecord,
    secret: str | None = None,
) -> None:
    """The record with its usage now (or as it was, if it vanished since), and its
    requests in flight, as the admin API shows one key."""
    _, report = await store.report(record.id)
    data = report.to_json() if report else record.to_json(int(time.time() * 1000))
    if report:
        count, reserved = await store.reservations(record.id)
        data["in_flight"], data["reserved"] = count, from_micro(reserved)
    if args.json:
        print(json.dumps({**data, "key": secret} if secret else data, indent=2))
        return
    models = data.pop("usage_by_model", None)
    print(table.record(data))
    if models and any(models.values()):
        print(f"\n{models_table(models)}")
    if secret:
        print(f"\nsecret (shown once, store it now): {secret}")


_MODEL_HEADINGS = ("PERIOD", "MODEL", "COST", "INPUT_TOKENS", "OUTPUT_TOKENS", "REQUESTS")


def models_table(periods: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Usage per model as a table: ``periods`` maps a period's label (``daily``,
    ``2026-11-22``) to its models as the API shows them (``usage_by_model``, a usage
    point's ``models``); periods without any are left out."""
    cells = [list(_MODEL_HEADINGS)]
    for period, models in periods.items():
        cells += [
            [
                period,
                model,
                table.credits(usage["cost"]),
                str(usage["input_tokens"]),
                str(usage["output_tokens"]),
                str(usage["requests"]),
            ]
            for model, usage in models.items()
        ]
    if len(cells) == 1:
        return "no usage by model"
    widths = [max(len(row[i]) for row in cells) for i in range(len(_MODEL_HEADINGS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _create(args: argparse.Namespace) -> int:
    body = _body(args)
    if args.mode == "import":
        if args.key is not None:
            body["key"] = sys.stdin.readline().strip() if args.key == "-" else args.key
        else:
            body["sha256"] = args.sha256

    async def action(store: KeyStore, settings: Settings) -> int:
        values = _validate(body, args.mode, settings.keys.secret_prefix)
        values.setdefault("workspace_id", settings.admin.default_workspace)
        values.setdefault("user_id", str(uuid.uuid4()))
        secret, sha256 = values.pop("key", None), values.pop("sha256", None)
        try:
            issued: Issued = await store.create(values, secret=secret, sha256=sha256)
        except KeyExists as exc:
            raise CommandError(str(exc), 1, "conflict") from None
        await _print(args, store, issued.record, issued.secret)
        return 0

    return _run(args, action)


def _list(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise _invalid("--limit: must be from 1 to 1000")

    async def action(store: KeyStore, _settings: Settings) -> int:
        now = await _now_ms(store)
        name = args.name.casefold() if args.name is not None else None

        def wanted(record: KeyRecord) -> bool:
            if name is not None and name not in (record.name or "").casefold():
                return False
            return args.status is None or record.status(now) == args.status

        try:
            page = await store.list(
                workspace_id=args.workspace,
                user_id=args.user_id,
                include_disabled=args.include_disabled or args.status is not None,
                limit=args.limit,
                cursor=args.cursor,
                where=wanted,
            )
        except BadCursor as exc:
            raise _invalid(f"--cursor: {exc}") from None
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
    async def action(store: KeyStore, _settings: Settings) -> int:
        record = await store.get(_key_id(args.key_id))
        if record is None:
            raise _no_key(args.key_id)
        await _print(args, store, record)
        return 0

    return _run(args, action)


def _adjustments(args: argparse.Namespace) -> bool:
    return bool(
        args.add_scopes or args.remove_scopes or args.add_resources or args.remove_resources
    )


def _adjusted(record: KeyRecord, args: argparse.Namespace) -> dict[str, Any]:
    """The scopes and resources after --add-*/--remove-*, as update body fields.

    Read from the record just before the update: a change made by someone else between the
    two is overwritten, as with any update that names the whole list."""
    body: dict[str, Any] = {}
    if args.add_scopes or args.remove_scopes:
        scopes = list(record.scopes)
        for scope in args.remove_scopes:
            if scope not in scopes:
                wider = [held for held in scopes if grants([held], scope)]
                raise _invalid(
                    f"--remove-scope: the key does not hold {scope!r}"
                    + (
                        f" itself ({', '.join(wider)} grants it); remove "
                        f"{', '.join(wider)} and add what should stay"
                        if wider
                        else ""
                    )
                )
            scopes.remove(scope)
        body["scopes"] = scopes + [s for s in args.add_scopes if s not in scopes]
    if args.add_resources or args.remove_resources:
        if record.resources is None:
            if args.add_resources:
                raise _invalid(
                    "--add-resource: the key may use any resource; "
                    f"--resource {args.add_resources[0]} limits it to a list"
                )
            raise _invalid(
                "--remove-resource: the key may use any resource; there is no list to remove from"
            )
        resources = list(record.resources)
        for resource in args.remove_resources:
            if resource not in resources:
                raise _invalid(f"--remove-resource: the key's list does not have {resource!r}")
            resources.remove(resource)
        body["resources"] = resources + [r for r in args.add_resources if r not in resources]
    return body


def _update(args: argparse.Namespace) -> int:
    body = _body(args)
    if not body and not _adjustments(args):
        raise _invalid("name at least one field to change")
    if args.scopes is not None and (args.add_scopes or args.remove_scopes):
        raise _invalid("--scope replaces every scope: give either it or --add-scope/--remove-scope")
    if args.resources is not None and (args.add_resources or args.remove_resources):
        raise _invalid(
            "--resource replaces the list: give either it or --add-resource/--remove-resource"
        )

    async def action(store: KeyStore, _settings: Settings) -> int:
        key_id = _key_id(args.key_id)
        changes = dict(body)
        if _adjustments(args):
            current = await store.get(key_id)
            if current is None:
                raise _no_key(args.key_id)
            changes.update(_adjusted(current, args))
        record = await store.update(key_id, _validate(changes, "update"))
        if record is None:
            raise _no_key(args.key_id)
        await _print(args, store, record)
        return 0

    return _run(args, action)


def _usage(args: argparse.Namespace) -> int:
    async def action(store: KeyStore, _settings: Settings) -> int:
        key_id = _key_id(args.key_id)
        if await store.get(key_id) is None:
            raise _no_key(args.key_id)
        found = await history.read(store.client, store.names, key_id, await _now_ms(store))
        data = found.to_json()  # what GET /v1/keys/{id}/usage answers
        periods = [args.period] if args.period else list(PERIODS)
        if args.json:
            shown = {k: v for k, v in data.items() if k not in PERIODS or k in periods}
            print(json.dumps(shown, indent=2))
        else:
            print(table.usage({period: data[period] for period in periods}))
            # Per model: the periods that have any, oldest first, as the tables above.
            by_model = {
                point["period"]: point["models"]
                for period in periods
                for point in data[period]
                if "models" in point
            }
            if by_model:
                print(f"\nby model\n{models_table(by_model)}")
        return 0

    return _run(args, action)


def _confirm(record: KeyRecord) -> bool:
    """Ask on the terminal; only an explicit yes revokes."""
    print(
        f"revoke key {record.id} ({record.name or 'unnamed'}, {record.label}, workspace "
        f"{record.workspace_id})? Requests with it are refused at once, everywhere; this "
        "cannot be undone. [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _revoke(args: argparse.Namespace) -> int:
    # Only a person at a terminal is asked: a script (standard input not a terminal) keeps
    # working unchanged, as with rm.
    ask = not args.yes and sys.stdin.isatty()

    async def action(store: KeyStore, _settings: Settings) -> int:
        key_id = _key_id(args.key_id)
        if ask:
            record = await store.get(key_id)
            if record is None:
                raise _no_key(args.key_id)
            if not await asyncio.to_thread(_confirm, record):
                raise CommandError("not revoked", 1, "not_confirmed")
        if not await store.revoke(key_id):
            raise _no_key(args.key_id)
        print(json.dumps({"id": key_id, "revoked": True}) if args.json else f"revoked {key_id}")
        return 0

    return _run(args, action)


def _rotate(args: argparse.Namespace) -> int:
    if not 0 <= args.grace_seconds <= 30 * 86_400:
        raise _invalid("--grace-seconds: must be from 0 to 2592000")

    async def action(store: KeyStore, _settings: Settings) -> int:
        issued = await store.rotate(_key_id(args.key_id), args.grace_seconds)
        if issued is None:
            raise _no_key(args.key_id)
        await _print(args, store, issued.record, issued.secret)
        return 0

    return _run(args, action)
