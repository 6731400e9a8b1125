"""`keygate keys ...` as an operator runs it: the real console script, a real server.

Most tests point the CLI at the session's server with this test's key prefix (the
``redis`` fixture deletes everything under it afterwards); the last ones use the default
embedded mode, where the CLI starts and stops its own server, or attaches to the one a
running ``keygate serve`` owns.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.store import secrets
from gateway.store.keystore import KeyStore
from tests.conftest import bearer
from tests.procs import (
    KEYGATE,
    Result,
    alive,
    answers,
    clean_env,
    embedded_config,
    http_get,
    keygate,
    parent_of,
    server_pid,
    serving,
    short_tmpdir,
    sync_redis_client,
    write_config,
)

Cli = Callable[..., Awaitable[Result]]
MakeKey = Callable[..., Awaitable[Any]]


@pytest.fixture
def config(tmp_path: Path, redis_url: str, key_prefix: str) -> Path:
    """The session's server, under the same key prefix the ``redis`` fixture cleans up."""
    return write_config(
        tmp_path / "gateway.yaml",
        {"redis": {"url": redis_url, "key_prefix": key_prefix}, "log": {"level": "warning"}},
    )


@pytest.fixture
def cli(config: Path, tmp_path: Path, redis: Redis) -> Cli:
    """``await cli("keys", "create", ...)``: one keygate process with this test's config.

    (``redis`` is there for its teardown: it deletes every key under this test's prefix.)
    """

    async def run(*args: str, stdin: str | None = None) -> Result:
        process = await asyncio.create_subprocess_exec(
            *KEYGATE,
            *args,
            "--config",
            str(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=clean_env(),
        )
        try:
            out, err = await asyncio.wait_for(
                process.communicate(stdin.encode() if stdin is not None else b""), 30
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        assert "Traceback" not in err.decode(), err.decode()
        return Result(process.returncode, out.decode(), without_summary(err.decode()))

    return run


def without_summary(err: str) -> str:
    """stderr without the line a keys command starts with once it has read its config
    (which file, which key store); tests/cli/test_store_location.py checks that line."""
    first, _, rest = err.partition("\n")
    return rest if first.startswith("keygate: config ") else err


def ok(result: Result) -> Result:
    assert result.code == 0, result
    assert result.err == "", result.err
    return result


def table(text: str) -> dict[str, str]:
    """The readable form of one record: ``field  value`` lines."""
    rows = {}
    for line in text.splitlines():
        if not line.strip():
            break
        name, _, value = line.partition(" ")
        rows[name] = value.strip()
    return rows


def tampered(secret: str) -> str:
    """The secret with its last character changed."""
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- create, show, list: the secret is printed once ----------------------------------------


async def test_create_prints_the_secret_once_and_show_and_list_never(
    cli: Cli, store: KeyStore
) -> None:
    user = str(uuid.uuid4())
    created = ok(
        await cli(
            "keys", "create", "--json", "--name", "ci bot", "--workspace", "ws-cli",
            "--user-id", user, "--scope", "chat:invoke", "--scope", "apikeys:view",
            "--resource", "gpt-4o-mini", "--limit", "12.5", "--limit-reset", "monthly",
            "--rate-limit", "100/60", "--metadata", "team=ml", "--team-name", "ML",
            "--type", "WORKSPACE_INVOKE", "--expires-at", "2099-01-31T00:00:00Z",
        )
    ).json()  # fmt: skip
    secret = created["key"]
    assert re.fullmatch(r"kg_[0-9A-Za-z]{36}", secret)
    assert created["hash"] == sha256(secret)
    assert created["prefix"] == secret[:12] and secret not in created["label"]
    expected = {
        "name": "ci bot",
        "workspace_id": "ws-cli",
        "user_id": user,
        "scopes": ["chat:invoke", "apikeys:view"],
        "resources": ["gpt-4o-mini"],
        "limit": 12.5,
        "limit_reset": "monthly",
        "rate_limit": {"requests": 100, "period_seconds": 60.0},
        "metadata": {"team": "ml"},
        "team_name": "ML",
        "type": "WORKSPACE_INVOKE",
        "expires_at": "2099-01-31T00:00:00.000Z",
        "status": "active",
        "disabled": False,
        "imported": False,
    }
    assert {k: created[k] for k in expected} == expected

    auth = await store.authenticate(secret)
    assert auth.status == "ok" and auth.record is not None and auth.record.id == created["id"]

    # The readable form prints the secret once, after the record.
    text = ok(await cli("keys", "create", "--name", "readable"))
    fields = table(text.out)
    shown = re.findall(r"^secret \(shown once, store it now\): (\S+)$", text.out, re.M)
    assert len(shown) == 1 and text.out.count(shown[0]) == 1
    assert fields["name"] == "readable" and fields["status"] == "active"
    assert fields["hash"] == sha256(shown[0])
    assert fields["workspace_id"] == "default"  # admin.default_workspace

    outputs = await asyncio.gather(
        cli("keys", "show", created["id"], "--json"),
        cli("keys", "show", created["id"]),
        cli("keys", "list", "--json"),
        cli("keys", "list"),
    )
    for result in map(ok, outputs):
        assert secret not in result.out and shown[0] not in result.out
    shown_json = outputs[0].json()
    assert "key" not in shown_json
    # rate_limit_state.full_at is "now" when the key is idle: it moves between reads.
    moving = ("key", "rate_limit_state")
    assert {k: v for k, v in shown_json.items() if k not in moving} == {
        k: v for k, v in created.items() if k not in moving
    }
    rows = table(outputs[1].out)
    assert rows["id"] == created["id"] and rows["label"] == created["label"]
    assert rows["scopes"] == "chat:invoke,apikeys:view" and rows["limit"] == "12.5"
    listed = outputs[2].json()
    assert listed["next_cursor"] is None
    assert {r["id"] for r in listed["data"]} == {created["id"], fields["id"]}
    assert all("key" not in r for r in listed["data"])
    lines = outputs[3].out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "LABEL", "WORKSPACE_ID", "SCOPES", "STATUS",
                                "USAGE", "LIMIT", "LAST_USED", "CREATED_AT"]  # fmt: skip
    assert len(lines) == 3
    assert any(line.startswith(created["id"]) and "ci bot" in line for line in lines)


async def test_an_unknown_id_exits_1(cli: Cli) -> None:
    missing = str(uuid.uuid4())
    results = await asyncio.gather(
        cli("keys", "show", "not-a-uuid"),
        cli("keys", "update", missing, "--name", "x"),
        cli("keys", "rotate", missing),
    )
    given = ["not-a-uuid", missing, missing]
    for result, raw in zip(results, given, strict=True):
        assert result.code == 1 and result.out == "", result
        assert result.err == f"keygate: no API key with id {raw!r}\n"


# --- import --------------------------------------------------------------------------------


async def test_import_by_key_stdin_and_sha256_and_refuse_duplicates(
    cli: Cli, store: KeyStore, make_key: MakeKey
) -> None:
    legacy, piped, hashed, old = (f"sk-legacy-{uuid.uuid4().hex}" for _ in range(4))
    by_key, by_stdin, by_hash, readable = await asyncio.gather(
        cli("keys", "import", "--key", legacy, "--name", "legacy", "--json"),
        cli("keys", "import", "--key", "-", "--scope", "chat:invoke", "--json",
            stdin=piped + "\n"),
        cli("keys", "import", "--sha256", sha256(hashed).upper(), "--workspace", "ws-b",
            "--json"),
        cli("keys", "import", "--key", old, "--name", "old"),
    )  # fmt: skip
    rows = table(ok(readable).out)
    assert rows["imported"] == "True" and rows["name"] == "old" and rows["hash"] == sha256(old)
    assert old not in readable.out and "secret" not in readable.out
    records = [ok(r).json() for r in (by_key, by_stdin, by_hash)]
    for result, secret, record in zip(
        (by_key, by_stdin, by_hash), (legacy, piped, hashed), records, strict=True
    ):
        assert "key" not in record  # keygate did not make this secret: nothing to show once
        assert secret not in result.out
        assert record["imported"] is True and record["hash"] == sha256(secret)
        auth = await store.authenticate(secret)
        assert auth.status == "ok" and auth.record is not None
        assert auth.record.id == record["id"]
    assert records[0]["name"] == "legacy" and records[1]["scopes"] == ["chat:invoke"]
    assert records[2]["workspace_id"] == "ws-b"
    assert records[2]["label"] == f"imported:{records[2]['id'][:8]}"  # nothing of the hash

    generated = (await make_key()).secret
    again = await asyncio.gather(
        cli("keys", "import", "--key", "-", stdin=piped),
        cli("keys", "import", "--sha256", sha256(hashed)),
        cli("keys", "import", "--key", generated),
    )
    for result in again:
        assert result.code == 1, result
        assert result.err == "keygate: a key with this secret already exists\n"
        assert result.out == ""
    assert len((await store.list(workspace_id=None)).records) == 5  # nothing was added


# --- list: filters and paging --------------------------------------------------------------


async def test_list_filters(cli: Cli, make_key: MakeKey) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    a1 = await make_key(workspace_id="ws-a", user_id=alice, name="a1")
    a2 = await make_key(workspace_id="ws-a", user_id=bob, name="a2")
    off = await make_key(workspace_id="ws-a", user_id=alice, name="off", disabled=True)
    b1 = await make_key(workspace_id="ws-b", user_id=alice, name="b1")

    async def ids(*args: str) -> list[str]:
        return [r["id"] for r in ok(await cli("keys", "list", "--json", *args)).json()["data"]]

    *found, empty = await asyncio.gather(
        ids(),
        ids("--workspace", "ws-a"),
        ids("--workspace", "ws-a", "--include-disabled"),
        ids("--user-id", alice),
        ids("--user-id", alice, "--include-disabled", "--workspace", "ws-a"),
        cli("keys", "list", "--workspace", "ws-none"),
    )

    def listed(*keys: Any) -> list[str]:  # index order: created_at, then id within a ms
        return [k.record.id for k in sorted(keys, key=lambda k: k.record.index_member())]

    assert found == [
        listed(a1, a2, b1),
        listed(a1, a2),
        listed(a1, a2, off),
        listed(a1, b1),
        listed(a1, off),
    ]
    assert ok(empty).out == "no keys\n"


async def test_list_pages_visit_every_key_exactly_once(cli: Cli, make_key: MakeKey) -> None:
    made = [await make_key(workspace_id="ws-p", name=f"k{i}") for i in range(8)]
    await make_key(workspace_id="ws-p", disabled=True)  # skipped, without breaking pages
    await make_key(workspace_id="ws-other")

    first_text = asyncio.ensure_future(cli("keys", "list", "--workspace", "ws-p", "--limit", "3"))
    seen: list[str] = []
    cursor: str | None = None
    cursors: list[str] = []
    pages = 0
    while True:
        args = ["keys", "list", "--json", "--workspace", "ws-p", "--limit", "3"]
        page = ok(await cli(*args, *(["--cursor", cursor] if cursor else []))).json()
        pages += 1
        assert len(page["data"]) <= 3
        seen += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        cursors.append(cursor)
        assert pages < 10, "paging does not end"
    assert seen == [k.record.id for k in sorted(made, key=lambda k: k.record.index_member())]
    assert pages == 3

    lines = ok(await first_text).out.splitlines()
    assert lines[-1] == f"more: --cursor {cursors[0]}"
    assert [line.split()[0] for line in lines[1:4]] == seen[:3]


# --- update --------------------------------------------------------------------------------


async def test_update_changes_only_the_given_fields(cli: Cli, store: KeyStore) -> None:
    created = ok(
        await cli(
            "keys", "create", "--json", "--name", "before", "--team-name", "T",
            "--scope", "a:b", "--limit", "5", "--limit-reset", "daily",
            "--metadata", "k=v", "--rate-limit", "10/1",
        )
    ).json()  # fmt: skip
    key_id, secret = created["id"], created.pop("key")

    def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
        # Derived from what changed (limit -> limit_remaining, caps) or from "now".
        derived = {"updated_at", "limit_remaining", "caps", "rate_limit_state"}
        return {k for k in before if before[k] != after[k]} - derived

    renamed = ok(await cli("keys", "update", key_id, "--name", "after"))
    rows = table(renamed.out)
    assert rows["name"] == "after" and rows["team_name"] == "T" and rows["limit"] == "5.0"
    assert secret not in renamed.out
    renamed_json = {**created, "name": "after", "updated_at": None}

    more = ok(
        await cli(
            "keys", "update", key_id, "--json", "--scope", "x:y", "--scope", "z:*",
            "--limit", "7.25", "--expires-at", "2098-06-01T12:00:00+02:00",
            "--clear", "team_name",
        )
    ).json()  # fmt: skip
    assert changed(renamed_json, more) == {"scopes", "limit", "expires_at", "team_name"}
    assert more["scopes"] == ["x:y", "z:*"] and more["limit"] == 7.25
    assert more["expires_at"] == "2098-06-01T10:00:00.000Z" and more["team_name"] is None

    disabled = ok(
        await cli("keys", "update", key_id, "--json", "--clear", "name", "--disable")
    ).json()
    assert changed(more, disabled) == {"name", "disabled", "status"}
    assert disabled["name"] is None
    assert disabled["disabled"] is True and disabled["status"] == "disabled"
    assert (await store.authenticate(secret)).status == "disabled"
    hidden, shown = await asyncio.gather(
        cli("keys", "list", "--json"), cli("keys", "list", "--json", "--include-disabled")
    )
    assert ok(hidden).json()["data"] == []
    assert [r["id"] for r in ok(shown).json()["data"]] == [key_id]

    enabled = ok(await cli("keys", "update", key_id, "--enable", "--json")).json()
    assert changed(disabled, enabled) == {"disabled", "status"}
    assert enabled["status"] == "active"
    assert (await store.authenticate(secret)).status == "ok"
    assert enabled["hash"] == created["hash"] and enabled["created_at"] == created["created_at"]
    assert enabled["metadata"] == {"k": "v"} and enabled["limit_reset"] == "daily"
    assert enabled["rate_limit"] == {"requests": 10, "period_seconds": 1.0}


async def test_max_in_flight_is_set_changed_and_cleared(cli: Cli) -> None:
    created = ok(await cli("keys", "create", "--json", "--max-in-flight", "5")).json()
    assert created["max_in_flight"] == 5
    key_id = created["id"]
    changed = ok(await cli("keys", "update", key_id, "--json", "--max-in-flight", "7")).json()
    assert changed["max_in_flight"] == 7
    cleared = ok(await cli("keys", "update", key_id, "--json", "--max-in-flight", "0")).json()
    assert cleared["max_in_flight"] is None
    ok(await cli("keys", "update", key_id, "--max-in-flight", "3"))
    by_name = ok(await cli("keys", "update", key_id, "--json", "--max-in-flight", "none")).json()
    assert by_name["max_in_flight"] is None
    ok(await cli("keys", "update", key_id, "--max-in-flight", "3"))
    by_clear = ok(await cli("keys", "update", key_id, "--json", "--clear", "max_in_flight")).json()
    assert by_clear["max_in_flight"] is None
    shown = ok(await cli("keys", "show", key_id, "--json")).json()
    assert shown["max_in_flight"] is None


async def test_token_limits_are_set_replaced_and_cleared(cli: Cli) -> None:
    created = ok(
        await cli(
            "keys", "create", "--json", "--token-limit", "1000/60", "--token-limit", "50000/86400"
        )
    ).json()
    assert created["token_limits"] == [
        {"tokens": 1000, "period_seconds": 60.0},
        {"tokens": 50000, "period_seconds": 86400.0},
    ]
    key_id = created["id"]
    changed = ok(await cli("keys", "update", key_id, "--json", "--token-limit", "10/1")).json()
    assert changed["token_limits"] == [{"tokens": 10, "period_seconds": 1.0}]
    cleared = ok(await cli("keys", "update", key_id, "--json", "--token-limit", "0")).json()
    assert cleared["token_limits"] == []
    shown = ok(await cli("keys", "show", key_id, "--json")).json()
    assert shown["token_limits"] == []


# --- revoke and rotate ---------------------------------------------------------------------


async def test_revoke_then_show_says_no_such_key(
    cli: Cli, store: KeyStore, make_key: MakeKey
) -> None:
    first_key, second_key = [
        {"id": k.record.id, "key": k.secret} for k in (await make_key(), await make_key())
    ]
    revoked = ok(await cli("keys", "revoke", first_key["id"], "--json"))
    assert revoked.json() == {"id": first_key["id"], "revoked": True}
    assert ok(await cli("keys", "revoke", second_key["id"])).out == (
        f"revoked {second_key['id']}\n"
    )

    shown, again, listed = await asyncio.gather(
        cli("keys", "show", first_key["id"]),
        cli("keys", "revoke", first_key["id"]),
        cli("keys", "list", "--json", "--include-disabled"),
    )
    for result in (shown, again):
        assert result.code == 1
        assert result.err == f"keygate: no API key with id {first_key['id']!r}\n"
    assert ok(listed).json()["data"] == []
    assert (await store.authenticate(first_key["key"])).status == "not_found"
    assert (await store.authenticate(second_key["key"])).status == "not_found"


async def test_spend_caps_and_byok_inclusion_and_usage_in_show(
    cli: Cli, store: KeyStore, redis: Any, key_prefix: str
) -> None:
    created = ok(
        await cli(
            "keys", "create", "--json", "--limit", "5", "--limit-reset", "daily",
            "--spend-cap", "50/monthly", "--spend-cap", "400/total", "--include-byok-in-limit",
        )
    ).json()  # fmt: skip
    assert created["spend_caps"] == [
        {"amount": 50.0, "period": "monthly"},
        {"amount": 400.0, "period": "total"},
    ]
    assert created["include_byok_in_limit"] is True
    assert [cap["name"] for cap in created["caps"]] == ["limit", "spend_caps[0]", "spend_caps[1]"]
    await redis.set(f"{key_prefix}u:{{{created['id']}}}:t", 1_250_000)
    shown = ok(await cli("keys", "show", "--json", created["id"])).json()
    assert shown["usage"] == 1.25 and shown["caps"][2]["remaining"] == 398.75
    changed = ok(
        await cli("keys", "update", "--json", created["id"], "--exclude-byok-from-limit")
    ).json()
    assert changed["include_byok_in_limit"] is False


async def test_rotate_gives_a_new_secret_and_the_old_one_stops(
    cli: Cli, store: KeyStore, make_key: MakeKey
) -> None:
    issued = await make_key(name="r")
    created = {"id": issued.record.id, "key": issued.secret}
    rotated = ok(await cli("keys", "rotate", created["id"], "--json")).json()
    assert rotated["id"] == created["id"] and rotated["name"] == "r"
    assert rotated["key"] != created["key"] and rotated["hash"] == sha256(rotated["key"])
    assert (await store.authenticate(created["key"])).status == "not_found"
    assert (await store.authenticate(rotated["key"])).status == "ok"

    text = ok(await cli("keys", "rotate", created["id"]))
    newest = re.findall(r"^secret \(shown once, store it now\): (\S+)$", text.out, re.M)
    assert len(newest) == 1 and newest[0] not in (created["key"], rotated["key"])
    assert (await store.authenticate(rotated["key"])).status == "not_found"
    shown = ok(await cli("keys", "show", created["id"], "--json"))
    assert newest[0] not in shown.out and "grace" not in shown.out


async def test_rotate_with_grace_keeps_the_old_secret_until_the_grace_ends(
    cli: Cli, store: KeyStore, make_key: MakeKey
) -> None:
    grace = 2.0
    issued = await make_key()
    created = {"id": issued.record.id, "key": issued.secret}
    before = time.monotonic()  # the grace starts later, inside the CLI
    rotated = ok(
        await cli("keys", "rotate", created["id"], "--grace-seconds", str(grace), "--json")
    ).json()
    old = await store.authenticate(created["key"])
    assert old.status == "ok" and old.record is not None and old.record.id == created["id"]
    assert (await store.authenticate(rotated["key"])).status == "ok"
    assert "grace" not in json.dumps(rotated)

    while (await store.authenticate(created["key"])).status == "ok":
        assert time.monotonic() - before < grace + 5, "the old secret outlived its grace"
        await asyncio.sleep(0.05)
    assert time.monotonic() - before > grace, "the grace was cut short"
    assert (await store.authenticate(rotated["key"])).status == "ok"


# --- bad input: exit status 2 and a line that names the field ------------------------------

ANY_ID = str(uuid.uuid4())
# keygate's prefix and length, a bad checksum (fixed, so the test id is too)
MISTYPED = tampered("kg_" + "7" * 30 + secrets.checksum("kg_" + "7" * 30))
BAD_INPUT: list[tuple[list[str], tuple[str, ...]]] = [
    (["create", "--limit", "-1"], (r"^keygate: limit: must be at least 0$",)),
    (["create", "--expires-at", "next tuesday"], (r"^keygate: expires_at: must be an RFC 3339",)),
    (["create", "--expires-at", "2001-01-01T00:00:00Z"], (r"^keygate: expires_at: .*future",)),
    (["create", "--limit-reset", "hourly"], (r"argument --limit-reset: invalid choice: 'hourly'",)),
    (["create", "--rate-limit", "ten"], (r"^keygate: --rate-limit: expected N/SECONDS",)),
    (["create", "--max-in-flight", "-1"], (r"^keygate: max_in_flight: must be an integer from 1",)),
    (["create", "--max-in-flight", "x"], (r"^keygate: --max-in-flight: expected a whole number",)),
    (["create", "--max-in-flight", "1.5"], (r"^keygate: --max-in-flight: expected a whole",)),
    (["create", "--spend-cap", "lots"], (r"^keygate: --spend-cap: expected AMOUNT/PERIOD",)),
    (["create", "--token-limit", "many"], (r"^keygate: --token-limit: expected N/SECONDS",)),
    (
        ["create", "--token-limit", "0/60"],
        (r"^keygate: token_limits: item 0 tokens must be an integer from 1 to",),
    ),
    (
        ["create", "--spend-cap", "5/hourly"],
        (r"^keygate: spend_caps: item 0 period must be one of daily, weekly, monthly, total$",),
    ),
    (["update", ANY_ID, "--metadata", "novalue"], (r"^keygate: --metadata: expected KEY=VALUE",)),
    (
        ["create", "--limit", "-1", "--expires-at", "soon", "--user-id", "x"],
        (
            r"^(keygate: )?limit: ",
            r"^(keygate: )?expires_at: ",
            r"^(keygate: )?user_id: ",
        ),  # all reported at once
    ),
    (["import", "--key", "short"], (r"^keygate: key: must be at least 16 characters",)),
    (["import", "--key", MISTYPED], (r"^keygate: key: has keygate's secret prefix 'kg_' and",)),
    (["import"], (r"one of the arguments --key --sha256 is required",)),
    (["list", "--limit", "-1"], (r"^keygate: --limit: must be from 1 to 1000$",)),
    (["list", "--cursor", "bm9wZQ"], (r"^keygate: --cursor: cursor is not one keygate issued$",)),
    (["update", ANY_ID], (r"^keygate: name at least one field to change$",)),
    (["update", ANY_ID, "--clear", "colour"], (r"^keygate: colour: unknown field$",)),
    (["rotate", ANY_ID, "--grace-seconds", "-1"], (r"^keygate: --grace-seconds: must be from 0",)),
]
BAD_IDS = [" ".join(args) for args, _ in BAD_INPUT]


@pytest.fixture(scope="module")
def bad_input_results(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Result, list[str]]]:
    """Every BAD_INPUT command, run at once (each ~0.5 s of start-up), each under its own
    key prefix: case id -> (result, keys it wrote)."""
    root = tmp_path_factory.mktemp("bad-input")
    prefixes = {case: f"kgt{uuid.uuid4().hex[:10]}:" for case in BAD_IDS}
    processes: dict[str, subprocess.Popen[str]] = {}
    for (args, _), case in zip(BAD_INPUT, BAD_IDS, strict=True):
        config = write_config(
            root / f"{prefixes[case][:-1]}.yaml",
            {"redis": {"url": redis_url, "key_prefix": prefixes[case]}},
        )
        processes[case] = subprocess.Popen(
            [*KEYGATE, "keys", *args, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
            env=clean_env(),
        )
    results = {}
    try:
        with sync_redis_client(redis_url, decode_responses=True) as client:
            for case, process in processes.items():
                out, err = process.communicate(timeout=60)
                written = list(client.scan_iter(match=f"{prefixes[case]}*"))
                if written:
                    client.delete(*written)
                results[case] = (Result(process.returncode, out, err), written)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.mark.parametrize(("args", "messages"), BAD_INPUT, ids=BAD_IDS)
def test_bad_input_exits_2_naming_the_field(
    bad_input_results: dict[str, tuple[Result, list[str]]],
    args: list[str],
    messages: tuple[str, ...],
) -> None:
    result, written = bad_input_results[" ".join(args)]
    assert result.code == 2, result
    assert result.out == "" and "Traceback" not in result.err, result
    lines = result.err.splitlines()
    for message in messages:
        assert any(re.search(message, line) for line in lines), (message, result.err)
    assert written == []  # nothing is written unless every field is valid


def test_an_unreachable_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "down.yaml",
        {"redis": {"url": "redis://127.0.0.1:1", "connect_timeout": 0.5}},
    )
    result = keygate("keys", "list", "--config", str(config), cwd=tmp_path)
    assert result.code == 1 and result.out == ""
    err = without_summary(result.err)
    assert err == "keygate: the key store failed: nothing listens on 127.0.0.1:1 (redis.url)\n"
    assert len(err.splitlines()) == 1


# --- embedded mode: the first admin key, with no key at all --------------------------------


def test_embedded_first_admin_key_then_serve_and_attach() -> None:
    with short_tmpdir() as root:
        config = write_config(root / "gateway.yaml", embedded_config(root))
        socket_path = root / "data" / "redis.sock"

        def run(*args: str) -> Result:
            result = keygate(*args, "--config", str(config), cwd=root)
            assert result.code == 0 and "Traceback" not in result.err, result
            return result

        admin = run("keys", "create", "--scope", "*", "--name", "root", "--json").json()
        # The CLI started its own server and stopped it again.
        assert not answers(socket_path)
        assert (root / "data" / "appendonlydir").is_dir()

        with serving(config, root) as serve:
            port = serve.admin_port
            server = server_pid(socket_path)
            assert parent_of(server) == serve.pid

            status, body = http_get(port, "/v1/keys", admin["key"])
            assert status == 200 and [r["id"] for r in body["data"]] == [admin["id"]]
            assert http_get(port, "/v1/keys")[0] == 401
            assert http_get(port, "/v1/keys", tampered(admin["key"]))[0] == 401

            # The CLI attaches to the running server: it works and does not stop it.
            listed = run("keys", "list", "--json").json()
            assert [r["id"] for r in listed["data"]] == [admin["id"]]
            viewer = run("keys", "create", "--scope", "apikeys:view", "--json").json()
            assert serve.process.poll() is None and alive(server)
            assert server_pid(socket_path) == server
            status, body = http_get(port, f"/v1/keys/{viewer['id']}", viewer["key"])
            assert status == 200 and body["scopes"] == ["apikeys:view"]

            assert serve.signal(signal.SIGTERM) == 0
        assert not alive(server)

        # The next CLI call owns the data_dir again; both keys survived.
        shown = run("keys", "list", "--json").json()
        assert [r["id"] for r in shown["data"]] == [admin["id"], viewer["id"]]
        assert not answers(socket_path)


# --- update: add and remove scopes and resources --------------------------------------------


async def test_update_adds_and_removes_scopes_and_resources(cli: Cli, store: KeyStore) -> None:
    created = ok(
        await cli(
            "keys", "create", "--json", "--scope", "a:read", "--scope", "b:*",
            "--resource", "m1", "--resource", "m2",
        )
    ).json()  # fmt: skip
    key_id = created["id"]
    changed = ok(
        await cli(
            "keys", "update", key_id, "--json", "--add-scope", "c:write",
            "--add-scope", "a:read", "--remove-scope", "b:*",
            "--add-resource", "m3", "--remove-resource", "m1",
        )
    ).json()  # fmt: skip
    assert changed["scopes"] == ["a:read", "c:write"]  # an added scope held already: once
    assert changed["resources"] == ["m2", "m3"]
    record = await store.get(key_id)
    assert record is not None and record.scopes == ("a:read", "c:write")

    # --scope still replaces the whole list, as its help says.
    replaced = ok(await cli("keys", "update", key_id, "--json", "--scope", "z:z")).json()
    assert replaced["scopes"] == ["z:z"]
    help_text = ok(await cli("keys", "update", "--help")).out
    assert re.search(r"--scope SCOPE\s+replace", help_text), help_text


async def test_update_refuses_adjustments_that_would_not_do_what_they_say(
    cli: Cli, store: KeyStore, make_key: MakeKey
) -> None:
    wide = (await make_key(scopes=["apikeys:*"], name="wide")).record
    anything = (await make_key(name="any model")).record  # resources null: any
    cases = [
        (
            [wide.id, "--remove-scope", "apikeys:delete"],
            "keygate: --remove-scope: the key does not hold 'apikeys:delete' itself "
            "(apikeys:* grants it); remove apikeys:* and add what should stay",
        ),
        (
            [wide.id, "--remove-scope", "nope"],
            "keygate: --remove-scope: the key does not hold 'nope'",
        ),
        (
            [wide.id, "--scope", "x:y", "--add-scope", "z:z"],
            "keygate: --scope replaces every scope: give either it or --add-scope/--remove-scope",
        ),
        (
            [anything.id, "--add-resource", "m1"],
            "keygate: --add-resource: the key may use any resource; --resource m1 limits it "
            "to a list",
        ),
        (
            [anything.id, "--remove-resource", "m1"],
            "keygate: --remove-resource: the key may use any resource; there is no list to "
            "remove from",
        ),
    ]
    results = await asyncio.gather(*(cli("keys", "update", *args) for args, _ in cases))
    for (args, message), result in zip(cases, results, strict=True):
        assert result.code == 2 and result.out == "", (args, result)
        assert result.err == message + "\n", args
    assert await store.get(wide.id) == wide and await store.get(anything.id) == anything


# --- usage: the history, as GET /v1/keys/{id}/usage serves it ---------------------------------


async def test_usage_prints_the_history_as_a_table_and_as_the_api_json(
    cli: Cli, make_key: MakeKey, redis: Any, key_prefix: str, admin_client: Any
) -> None:
    admin = await make_key(scopes=["apikeys:view"])
    key_id = (await make_key(name="charted")).record.id
    today = datetime.now(UTC)
    usage = f"{key_prefix}u:{{{key_id}}}:"
    await redis.set(f"{usage}d:{today:%Y%m%d}", 1_500_000)
    await redis.set(f"{usage}bd:{today:%Y%m%d}", 250_000)
    await redis.set(f"{usage}m:{today:%Y%m}", 4_000_000)

    as_json, table_text, monthly = await asyncio.gather(
        cli("keys", "usage", key_id, "--json"),
        cli("keys", "usage", key_id),
        cli("keys", "usage", key_id, "--period", "monthly"),
    )
    served = await admin_client.get(f"/v1/keys/{key_id}/usage", headers=bearer(admin.secret))
    assert served.status == 200
    expected = await served.json()
    printed = ok(as_json).json()
    assert {k: v for k, v in printed.items() if k != "now"} == {
        k: v for k, v in expected.items() if k != "now"
    }
    assert printed["daily"][-1]["usage"] == 1.5 and printed["daily"][-1]["byok_usage"] == 0.25

    lines = ok(table_text).out.splitlines()
    assert lines[0] == "daily (UTC)"
    assert lines[1].split() == ["PERIOD", "USAGE", "BYOK_USAGE"]
    assert f"{today:%Y-%m-%d}  1.5    0.25" in lines
    assert "weekly (UTC, ISO weeks)" in lines and "monthly (UTC)" in lines
    assert len(lines) == 3 * 3 + 90 + 26 + 24 - 1  # a title, a header and a blank between
    month = ok(monthly).out.splitlines()
    assert month[0] == "monthly (UTC)" and len(month) == 2 + 24
    assert month[-1].split() == [f"{today:%Y-%m}", "4", "0"]

    missing = await cli("keys", "usage", str(uuid.uuid4()))
    assert missing.code == 1 and missing.err.startswith("keygate: no API key with id")


# --- list: usage, limit, last use; filters by name and status ----------------------------------


async def test_list_shows_usage_limit_and_last_use_and_filters_by_name_and_status(
    cli: Cli, make_key: MakeKey, store: KeyStore, redis: Any, key_prefix: str
) -> None:
    bot = (await make_key(name="CI bot", limit_micro=5_000_000, limit_reset="daily")).record
    old = (await make_key(name="ci-old", disabled=True)).record
    web = (await make_key(name="web")).record
    now_ms = await store.server_time_ms()
    await store.update(web.id, {"expires_at": now_ms - 1000})  # expired a second ago
    today = datetime.now(UTC)
    await redis.set(f"{key_prefix}u:{{{bot.id}}}:t", 2_250_000)
    await redis.set(f"{key_prefix}u:{{{bot.id}}}:d:{today:%Y%m%d}", 1_250_000)
    await redis.hset(f"{key_prefix}k:{{{bot.id}}}", "last_used_at", 1_790_000_000_000)

    async def names(*args: str) -> list[str]:
        listed = ok(await cli("keys", "list", "--json", *args)).json()["data"]
        # Sorted: keys created within one millisecond list in id order, which is random.
        return sorted(row["name"] for row in listed)

    text, *found = await asyncio.gather(
        cli("keys", "list"),
        names("--name", "ci"),  # any case, anywhere in the name
        names("--name", "ci", "--include-disabled"),
        names("--status", "disabled"),
        names("--status", "expired"),
        names("--status", "active"),
    )
    assert found == [["CI bot"], ["CI bot", "ci-old"], ["ci-old"], ["web"], ["CI bot"]]
    lines = ok(text).out.splitlines()
    header = lines[0].split()
    row = next(line for line in lines if line.startswith(bot.id))
    cells = re.split(r"\s{2,}", row)
    assert dict(zip(header, cells, strict=True)) | {"CREATED_AT": ""} == {
        "ID": bot.id,
        "NAME": "CI bot",
        "LABEL": bot.label,
        "WORKSPACE_ID": "ws-a",
        "SCOPES": "-",
        "STATUS": "active",
        "USAGE": "2.25",
        "LIMIT": "1.25/5 daily",
        "LAST_USED": "2026-09-21T14:13:20.000Z",
        "CREATED_AT": "",
    }
    web_row = re.split(r"\s{2,}", next(line for line in lines if line.startswith(web.id)))
    assert web_row[header.index("STATUS")] == "expired"
    assert web_row[header.index("LAST_USED")] == "never"
    assert web_row[header.index("LIMIT")] == "-"
    assert old.id not in ok(text).out  # disabled keys only when asked for, as before


# --- revoke: a confirmation on a terminal --------------------------------------------------


def run_on_terminal(config: Path, cwd: Path, answer: str, *args: str) -> Result:
    """keygate with a pseudo-terminal as standard input, ``answer`` typed into it."""
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode())
        done = subprocess.run(
            [*KEYGATE, *args, "--config", str(config)],
            stdin=terminal,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=clean_env(),
            timeout=30,
            check=False,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    return Result(done.returncode, done.stdout, without_summary(done.stderr))


async def test_revoke_asks_on_a_terminal_unless_yes_and_never_in_a_pipe(
    cli: Cli, config: Path, tmp_path: Path, store: KeyStore, make_key: MakeKey
) -> None:
    kept, confirmed, forced, piped = [
        (await make_key(name=name)).record for name in ("kept", "confirmed", "forced", "piped")
    ]
    declined = await asyncio.to_thread(
        run_on_terminal, config, tmp_path, "n\n", "keys", "revoke", kept.id
    )
    assert declined.code == 1 and declined.out == "", declined
    assert declined.err.startswith(f"revoke key {kept.id} (kept, {kept.label}, workspace ws-a)?")
    assert declined.err.endswith("[y/N] keygate: not revoked\n")
    assert await store.get(kept.id) is not None

    agreed = await asyncio.to_thread(
        run_on_terminal, config, tmp_path, "y\n", "keys", "revoke", confirmed.id
    )
    assert agreed.code == 0 and agreed.out == f"revoked {confirmed.id}\n", agreed
    assert "[y/N]" in agreed.err
    assert await store.get(confirmed.id) is None

    without_asking = await asyncio.to_thread(
        run_on_terminal, config, tmp_path, "", "keys", "revoke", forced.id, "--yes"
    )
    assert without_asking.code == 0 and without_asking.err == "", without_asking
    assert await store.get(forced.id) is None

    # Standard input is not a terminal (a script, a pipe): no question, as rm does.
    ok(await cli("keys", "revoke", piped.id, stdin="n\n"))
    assert await store.get(piped.id) is None


# --- errors under --json: an RFC 9457 problem on stdout, non-zero exit ----------------------


async def test_errors_under_json_are_problem_documents_on_stdout(
    cli: Cli, make_key: MakeKey, tmp_path: Path
) -> None:
    missing = str(uuid.uuid4())
    taken = f"sk-taken-{uuid.uuid4().hex}"
    await cli("keys", "import", "--key", taken)
    not_found, invalid, usage_error, conflict, bad_id = await asyncio.gather(
        cli("keys", "show", missing, "--json"),
        cli("keys", "create", "--json", "--limit", "-1", "--user-id", "x"),
        cli("keys", "create", "--json", "--limit-reset", "hourly"),
        cli("keys", "import", "--json", "--key", taken),
        cli("keys", "revoke", "--json", "not-a-uuid"),
    )
    down = await asyncio.to_thread(
        keygate,
        "keys", "list", "--json", "--config",
        str(write_config(tmp_path / "down.yaml",
                         {"redis": {"url": "redis://127.0.0.1:1", "connect_timeout": 0.5}})),
        cwd=tmp_path,
    )  # fmt: skip

    def problem(result: Result, code: int) -> dict[str, Any]:
        """Under --json stdout holds one JSON document, the result or the problem."""
        assert result.code == code, result
        body: dict[str, Any] = result.json()
        assert "Traceback" not in result.err
        assert body["type"] == f"urn:keygate:error:{body['code']}"
        assert {"title", "detail"} <= set(body)
        return body

    assert problem(not_found, 1) == {
        "type": "urn:keygate:error:not_found",
        "title": "Not found",
        "status": 404,
        "detail": f"no API key with id {missing!r}",
        "code": "not_found",
    }
    body = problem(invalid, 2)
    assert body["status"] == 400 and body["code"] == "invalid_request"
    assert body["detail"] == "user_id: must be a UUID"  # the first; every one is listed
    assert [e["field"] for e in body["errors"]] == ["user_id", "limit"]
    body = problem(usage_error, 2)
    assert body["code"] == "invalid_request" and "--limit-reset" in body["detail"]
    assert problem(conflict, 1)["code"] == "conflict"
    assert problem(bad_id, 1)["code"] == "not_found"
    body = problem(down, 1)
    assert body["code"] == "store_error" and body["status"] == 503
    assert body["detail"] == "the key store failed: nothing listens on 127.0.0.1:1 (redis.url)"


# --- help: every option of every subcommand says what it does -------------------------------


def options_without_help(help_text: str) -> list[str]:
    """The entries of an argparse help text (options and positionals) that have no help:
    an entry is a line indented by two spaces; its help follows on the same line after two
    or more spaces, or on the deeper-indented lines below it."""
    entries: list[list[str]] = []
    in_section = False
    for line in help_text.splitlines():
        if re.match(r"^\S.*:$", line):  # "options:", "positional arguments:"
            in_section = True
        elif in_section and re.match(r"^  \S", line):
            invocation, *text = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            entries.append([invocation, *text])
        elif in_section and entries and line.startswith("   ") and line.strip():
            entries[-1].append(line.strip())
    return [entry[0] for entry in entries if len(entry) < 2]


def test_every_option_of_every_keys_subcommand_has_help(tmp_path: Path) -> None:
    overview = keygate("keys", "--help", cwd=tmp_path)
    assert overview.code == 0
    section = overview.out.split("positional arguments:", 1)[1]
    commands = re.findall(r"^    (\w[\w-]*)\s", section, re.M)
    assert set(commands) >= {
        "create", "import", "list", "show", "update", "usage", "revoke", "rotate"
    }  # fmt: skip
    processes = {
        command: subprocess.Popen(
            [*KEYGATE, "keys", command, "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=clean_env(),
        )
        for command in commands
    }
    missing = {}
    for command, process in processes.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "options:" in out
        if lacking := options_without_help(out):
            missing[command] = lacking
    assert missing == {}
