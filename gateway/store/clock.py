"""The clock the Lua scripts read: the Redis server's TIME, unless a test fixes it.

Every script takes the override as an argument: '' means the server's TIME, so replicas
agree; a test passes an instant in ms (gateway/usage/periods.py:FixedClock).
"""

from __future__ import annotations

from collections.abc import Callable

ClockOverride = Callable[[], str]


def server_clock() -> str:
    return ""
