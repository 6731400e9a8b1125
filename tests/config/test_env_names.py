"""Every KEYGATE_* name the repository uses (in code, tests, deploy files and docs) is an
option or a known non-option, so the check that refuses unknown variables never refuses
keygate's own tools: a new tool variable must join env.NOT_OPTIONS."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config.env import NOT_OPTIONS, option_of, unknown_variables

ROOT = Path(__file__).resolve().parents[2]
SEARCHED = ("gateway", "tests", "deploy", "docs", "config", ".ci", "Dockerfile", "README.md")
# Wrong on purpose, in the tests of that check.
TYPOS = {
    "KEYGATE_REDIS_URLL",
    "KEYGATE_LOGG_LEVEL",
    "KEYGATE_COLOUR",
    "KEYGATE_ROUTES",
    "KEYGATE_DIALECTS_KONPRO_ENABLED",
    "KEYGATE_REDIS_NOPE",
    "KEYGATE_PORT",
}
NAME = re.compile(r"\bKEYGATE_[A-Z0-9_]*[A-Z0-9]\b")


def _names() -> set[str]:
    found: set[str] = set()
    for entry in SEARCHED:
        path = ROOT / entry
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            if "__pycache__" in file.parts:
                continue
            try:
                found |= set(NAME.findall(file.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                continue
    return found


def test_every_keygate_name_in_the_repository_is_accepted() -> None:
    names = _names() - TYPOS
    assert "KEYGATE_TEST_REDIS_URL" in names and "KEYGATE_REDIS_URL" in names
    # (the value Kubernetes gives a Service's *_PORT variable; the tests name a few)
    assert unknown_variables(dict.fromkeys(names, "tcp://10.0.0.1:1")) == []
    assert names | {"KEYGATE_FUZZ_EXAMPLES"} >= NOT_OPTIONS  # none listed for nothing
    assert all(option_of(n) is None for n in NOT_OPTIONS)
