"""Which settings a reload (SIGHUP, ``POST /v1/admin/reload``) switches, and which wait
for a restart.

A reload switches what decides a request: routes, upstreams, listing dialects, where keys
are read from (``keys.sources``, ``keys.query_param``, ``keys.hide_credentials``),
``metrics.on_proxy`` and ``shutdown_timeout``. Cost rules, reservations and route rate
limits live on routes, so they switch too. Spending caps and per-key limits are stored
with each key in Redis and need no reload.

The rest is bound to things a running process cannot swap without dropping connections
or state: sockets (``listen``, ``admin_listen``, ``metrics.listen``), the Redis client and
its failure mode (``redis``), the process count (``workers``), the key format and hash
cache (``keys.secret_prefix``, ``keys.hash_cache_size``), client limits already applied to
open connections (``client``), the admin API (``admin``), metrics labels (``metrics``'s
``per_key``, ``per_key_max``) and logging (``log``). A reload keeps their running values
and names each that changed, so the operator knows a restart is due.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gateway.config.model import Settings


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: ``problems`` is empty when the new config is serving."""

    problems: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    routes: int = 0
    upstreams: int = 0
    generation: int = 0
    status: str = "reloaded"  # "signalled": every worker was told to reload

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "generation": self.generation,
            "routes": self.routes,
            "upstreams": self.upstreams,
            "restart_needed": list(self.restart_needed),
        }


# Options kept at their running values by a reload (dotted: a field of a section).
_RESTART_ONLY = (
    "listen",
    "admin_listen",
    "workers",
    "redis",
    "keys.secret_prefix",
    "keys.hash_cache_size",
    "client",
    "admin",
    "metrics.listen",
    "metrics.per_key",
    "metrics.per_key_max",
    "log",
)


def _get(settings: Settings, option: str) -> object:
    value: object = settings
    for part in option.split("."):
        value = getattr(value, part)
    return value


def restart_needed(running: Settings, read: Settings) -> list[str]:
    """The restart-only options whose value in ``read`` differs from ``running``."""
    return [o for o in _RESTART_ONLY if _get(running, o) != _get(read, o)]


def reloaded(running: Settings, read: Settings) -> Settings:
    """The settings a reload switches to: ``read``, with every restart-only option kept at
    its ``running`` value (a reload never half-applies a socket or a Redis change)."""
    for option in _RESTART_ONLY:
        read = _with(read, option.split("."), _get(running, option))
    return read


def _with(settings: Any, path: list[str], value: object) -> Any:
    """``settings`` (a frozen dataclass) with the option at ``path`` set to ``value``."""
    head, *rest = path
    inner = value if not rest else _with(getattr(settings, head), rest, value)
    return dataclasses.replace(settings, **{head: inner})
