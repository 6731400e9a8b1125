"""Scope matching: ``*`` grants everything, ``x:*`` grants every ``x:...`` scope."""

from __future__ import annotations

from collections.abc import Iterable

ORG_ADMIN = "org:admin"
# Scopes that confer power over keys or the whole organisation. Handing one out, or
# managing a key that holds one, needs the caller to hold it too; data-plane scopes
# (chat:invoke, models:*) are what admins issue freely.
PRIVILEGED_NAMESPACES = frozenset({"apikeys", "org"})


def grants(held: Iterable[str], needed: str) -> bool:
    """True when any held scope covers ``needed`` (compared literally, so a held ``x:*``
    covers a needed ``x:*`` but a held ``x:read`` never covers ``x:*``)."""
    for scope in held:
        if scope == needed or scope == "*":
            return True
        if scope.endswith(":*") and needed.startswith(scope[:-1]):
            return True
    return False


def missing(held: Iterable[str], needed: Iterable[str]) -> list[str]:
    """The needed scopes that ``held`` does not cover, in order."""
    held = tuple(held)
    return [scope for scope in needed if not grants(held, scope)]


def is_privileged(scope: str) -> bool:
    return scope == "*" or scope.partition(":")[0] in PRIVILEGED_NAMESPACES
