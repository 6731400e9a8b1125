"""Scope matching: ``*`` grants everything, ``x:*`` grants every ``x:...`` scope; and the
authorize script's scopes policy (gateway/policies/policy.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.config.model import Route
from gateway.errors import Outcome
from gateway.policies.policy import Asked, Policy, Refusal

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


class ScopesPolicy(Policy[dict[str, str]]):
    """The route's scopes per method must be held by the key (403 insufficient_scope)."""

    name = "scopes"
    fields = ("scopes",)
    method_arg_names = ("needed",)
    refusals = (("forbidden_scope", 0),)
    lua = """
--@check
-- ARG.needed: the scopes the request's method needs, space-separated ('' none).
if ARG.needed ~= '' then
  local scopes, held = FIELD.scopes or '[]', nil
  for needed in string.gmatch(ARG.needed, '%S+') do
    -- The scope itself, quoted, in the JSON list: granted without decoding it (stored
    -- scopes are [A-Za-z0-9_.:*-] only, so a match is always a whole list item).
    if not string.find(scopes, '"' .. needed .. '"', 1, true) then
      held = held or cjson.decode(scopes)
      local ok = false
      for _, s in ipairs(held) do
        if s == needed or s == '*'
          or (string.sub(s, -2) == ':*' and string.sub(needed, 1, #s - 1) == string.sub(s, 1, -2))
        then ok = true break end
      end
      if not ok then return refuse('forbidden_scope') end
    end
  end
end
"""

    def route_side(self, route: Route) -> dict[str, str]:
        """Method or "*" -> the scopes it needs, space-separated."""
        return {m: " ".join(s) for m, s in route.scopes.items()}

    def method_args(self, side: dict[str, str], method: str) -> tuple[str, ...]:
        return (needed_scopes(side, method),)

    def refusal(self, status: str, refused: Any, side: dict[str, str], asked: Asked) -> Refusal:
        needed = needed_scopes(side, asked.method).split()
        lacking = missing(asked.key_scopes, needed)
        return Refusal(
            Outcome.FORBIDDEN_SCOPE,
            f"this route needs the {' '.join(lacking)} scope",
            scope=" ".join(needed),
        )


def needed_scopes(by_method: dict[str, str], method: str) -> str:
    """An empty list for a method means "no scope", not "the route's default"."""
    needed = by_method.get(method)
    return by_method.get("*", "") if needed is None else needed
