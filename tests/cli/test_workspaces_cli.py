"""`keygate workspaces show|set` as an operator runs it: the real console script against
the session's server under this test's key prefix (the ``redis`` fixture deletes it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.store.keystore import KeyStore
from tests.conftest import MakeKey
from tests.procs import KEYGATE, Result, clean_env, write_config

Cli = Callable[..., Awaitable[Result]]


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, key_prefix: str, redis: Redis) -> Cli:
    """``await cli("workspaces", "show", ...)``: one keygate process with this test's
    config; stderr without the line that says which config and store it uses."""
    config = write_config(
        tmp_path / "gateway.yaml",
        {"redis": {"url": redis_url, "key_prefix": key_prefix}, "log": {"level": "warning"}},
    )

    async def run(*args: str) -> Result:
        process = await asyncio.create_subprocess_exec(
            *KEYGATE,
            *args,
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=clean_env(),
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        text = err.decode()
        assert "Traceback" not in text, text
        first, _, rest = text.partition("\n")
        return Result(process.returncode, out.decode(), rest if "config" in first else text)

    return run


async def test_set_then_show_caps_every_key_of_the_workspace(
    cli: Cli, make_key: MakeKey, store: KeyStore, redis: Redis
) -> None:
    existing = await make_key(workspace_id="team")
    done = await cli(
        "workspaces", "set", "team", "--spend-cap", "5:daily", "--spend-cap", "120.5/monthly",
        "--json",
    )  # fmt: skip
    assert (done.code, done.err) == (0, ""), done
    body = done.json()
    assert [(c["name"], c["amount"], c["period"], c["used"]) for c in body["spend_caps"]] == [
        ("workspace.spend_caps[0]", 5.0, "daily", 0.0),
        ("workspace.spend_caps[1]", 120.5, "monthly", 0.0),
    ]
    assert await redis.hget(store.names.record(existing.record.id), "workspace_capped") == "1"
    later = await make_key(workspace_id="team")
    assert await redis.hget(store.names.record(later.record.id), "workspace_capped") == "1"

    shown = await cli("workspaces", "show", "team", "--json")
    assert shown.code == 0
    got = shown.json()
    assert got["spend_caps"] == body["spend_caps"]
    assert got["usage"] == {"daily": 0.0, "weekly": 0.0, "monthly": 0.0, "total": 0.0}
    assert (got["in_flight"], got["reserved"]) == (0, 0.0)

    text = await cli("workspaces", "show", "team")
    assert text.code == 0
    lines = dict(line.split(None, 1) for line in text.out.splitlines())
    assert lines["workspace_id"] == "team"
    assert lines["spend_caps"].startswith("0/5 daily (resets ")
    assert "0/120.5 monthly" in lines["spend_caps"]
    assert lines["usage"] == "daily 0  weekly 0  monthly 0  total 0"
    assert lines["in_flight"] == "0 (reserved 0)"

    removed = await cli("workspaces", "set", "team", "--no-spend-caps", "--json")
    assert removed.code == 0 and removed.json()["spend_caps"] == []


@pytest.mark.parametrize(
    ("args", "fields"),
    [
        (
            ["--spend-cap", "5:hourly", "--spend-cap", "0:daily"],
            ["spend_caps[0].period", "spend_caps[1].amount"],
        ),
        (["--spend-cap", "1:daily"] * 9, ["spend_caps"]),
    ],
)
async def test_bad_caps_exit_2_naming_each_field_and_change_nothing(
    cli: Cli, args: list[str], fields: list[str]
) -> None:
    assert (await cli("workspaces", "set", "team", "--spend-cap", "3:weekly")).code == 0
    as_json = await cli("workspaces", "set", "team", *args, "--json")
    assert as_json.code == 2
    problem = as_json.json()
    assert problem["code"] == "invalid_request" and problem["status"] == 400
    assert [e["field"] for e in problem["errors"]] == fields
    in_words = await cli("workspaces", "set", "team", *args)
    assert in_words.code == 2 and in_words.out == ""
    assert in_words.err.startswith(f"keygate: {fields[0]}: ")
    shown = (await cli("workspaces", "show", "team", "--json")).json()
    assert [(c["amount"], c["period"]) for c in shown["spend_caps"]] == [(3.0, "weekly")]


async def test_malformed_command_lines_exit_2_in_words(cli: Cli) -> None:
    garbled = await cli("workspaces", "set", "team", "--spend-cap", "five:daily")
    assert garbled.code == 2
    assert "--spend-cap: expected AMOUNT:PERIOD" in garbled.err
    bad_id = await cli("workspaces", "show", "no spaces", "--json")
    assert bad_id.code == 2
    assert bad_id.json()["errors"][0]["field"] == "workspace_id"
    both = await cli("workspaces", "set", "team", "--spend-cap", "1:daily", "--no-spend-caps")
    assert both.code == 2 and "not allowed with" in both.err
    neither = await cli("workspaces", "set", "team")
    assert neither.code == 2 and "--spend-cap" in neither.err
