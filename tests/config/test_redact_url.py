"""Redis URLs in config problem lines never show a password, however it is spelled."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.reader import redact_url
from tests.cli.running import run
from tests.procs import write_config


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # keygate reads a userinfo without ':' as a password alone (as for redis-cli -a).
        ("redis://secret@host:6379", "redis://***@host:6379"),
        ("redis://secret@host:6379/0", "redis://***@host:6379/0"),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:secret@host", "redis://user:***@host"),
        ("rediss://user:p%40ss@host:6380/1", "rediss://user:***@host:6380/1"),
        ("unix://:secret@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        (
            "redis+sentinel://:secret@h1,h2/main?sentinel_password=other&x=1",
            "redis+sentinel://:***@h1,h2/main?sentinel_password=***&x=1",
        ),
        # Not a URL urlsplit can read (unbalanced bracket): still no password.
        ("redis://:secret@[::1", "redis://:***@[::1"),
        ("redis://secret@[::1:6379/0", "redis://***@[::1:6379/0"),
        # Nothing to hide.
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("embedded", "embedded"),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://secret@host:notaport/0",
        "redis://:secret@host:notaport/0",
        "http://secret@host:6379/0",
    ],
)
def test_a_problem_line_about_redis_url_shows_no_password(tmp_path: Path, url: str) -> None:
    write_config(tmp_path / "gw.yaml", {"redis": {"url": url}})
    checked = run("check-config", "gw.yaml", cwd=tmp_path)
    assert checked.code == 2, checked
    assert "redis.url" in checked.err and "***@host" in checked.err, checked.err
    assert "secret" not in checked.err + checked.out
