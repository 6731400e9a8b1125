"""What a scope may be: one rule for the scopes a key holds (gateway/store/input.py) and
the scopes a route asks for (gateway/config/load.py), so that no route can ask for a scope
no key can be given."""

from __future__ import annotations

import re
from typing import Any

SCOPE_PATTERN = r"^[A-Za-z0-9_.:*-]{1,128}$"
MAX_SCOPE = 128  # characters; the pattern says so too, but this check names the limit
_SCOPE = re.compile(SCOPE_PATTERN)


def parse_scope(value: Any, _now: int = 0) -> str:
    """``value`` when it is a scope; otherwise ValueError says why, in the words of every
    other key field's check (a field parser of gateway/store/input.py)."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > MAX_SCOPE:
        raise ValueError(f"must be at most {MAX_SCOPE} characters")
    if not _SCOPE.fullmatch(value):
        raise ValueError(f"must match {SCOPE_PATTERN}")
    return value
