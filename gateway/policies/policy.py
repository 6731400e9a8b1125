"""What a policy of the authorize script is made of (docs/architecture.md, "The authorize
script"): one module per policy, the script assembled from them in chain order at start-up
(gateway/policies/layout.py).

A policy owns, in its own module:

- its route-side values (``route_side``): what it takes from a route, built once per route;
- its slice of the script's arguments: ``route_args`` (the same for every request on a
  route), ``method_args`` (per route and method), both computed once per route at
  start-up, and ``request_args`` (per request, only on a route where
  ``varies_per_request``);
- the record fields its fragment reads (``fields``, HMGET names) and its own Redis names
  of the key (``keys``, built by ``redis_keys``);
- its Lua fragment (``lua``), in sections, each starting with a line ``--@<section>``:
  ``state`` (top-level locals its other sections share; what comes before the first
  marker belongs here too), ``prepare`` (runs before any policy's check), ``check`` (may
  ``return refuse(status, ...)``; any other ``return`` would end the script), ``commit``
  (runs once every check passed: its writes, and the ledger entry's ``entry_amount``,
  ``entry_byok``, ``entry_wanted``; ``entry_id`` and ``lease_end`` are given), ``note``
  (the body of ``function(admitted)`` returning the values added to every reply after the
  key's identity) and ``ok`` (an expression list: values added to an "ok" reply). The
  sections are inlined in the frame (gateway/store/lua/authorize.lua), which offers
  ``now``, ``now_us`` and lib.lua. It names its arguments ``ARG.<name>`` (its own and the
  frame's; ``ARG_AT.<name>`` is an argument's index), record fields ``FIELD.<name>`` and
  the key's Redis names ``KEY.<name>``: the assembler binds those to positions, so no
  fragment holds a position, and refuses a name nobody declared;
- its refusals (``refusals``: each status and how many reply values follow it), the typed value
  ``decode`` makes of those values, and ``refusal``: the response's status, detail,
  headers and body members.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from gateway.config.model import Route
from gateway.errors import Outcome
from gateway.store.names import KeyNames

Side = TypeVar("Side")


@dataclass(frozen=True, slots=True)
class Asked:
    """What a refused request asked for, as a refusal's words need it."""

    method: str
    resource: str | None  # the request's resource when read ("" for none)
    key_scopes: tuple[str, ...]  # what the key holds
    now_ms: int  # the script's clock


@dataclass(frozen=True, slots=True)
class Refusal:
    """A policy's answer to a refused request (gateway/errors.py makes the response)."""

    outcome: Outcome
    detail: str
    headers: Mapping[str, str] | None = None
    scope: str | None = None  # WWW-Authenticate's scope= (insufficient_scope)
    extra: Mapping[str, object] | None = field(default=None)  # problem body members


class Policy(Generic[Side]):
    """One check of the authorize script; subclasses fill in the class attributes and
    override what they use. Instances are stateless: one per process."""

    name: ClassVar[str]  # the fragment's Lua table name, e.g. "rate_limit"
    fields: ClassVar[tuple[str, ...]] = ()  # record fields the fragment reads
    keys: ClassVar[tuple[str, ...]] = ()  # its own Redis names of the key (KEY.<name>)
    route_arg_names: ClassVar[tuple[str, ...]] = ()  # ARG names, same for a route's requests
    method_arg_names: ClassVar[tuple[str, ...]] = ()  # ARG names, per route and method
    request_arg_names: ClassVar[tuple[str, ...]] = ()  # ARG names, per request
    note_names: ClassVar[tuple[str, ...]] = ()  # values P.note() adds to every reply
    ok_names: ClassVar[tuple[str, ...]] = ()  # values P.ok() adds to an "ok" reply
    refusals: ClassVar[tuple[tuple[str, int], ...]] = ()  # (status, how many values follow)
    lua: ClassVar[str] = ""

    def redis_keys(self, names: KeyNames, key_id: str, route: str) -> tuple[str, ...]:
        """The Redis names ``keys`` declares, in that order, for key ``key_id`` on route
        ``route``: each with the key's hash tag (one script touches one Cluster slot)."""
        return ()

    def route_side(self, route: Route) -> Side:
        """This policy's values for ``route`` (once per route, at start-up or reload)."""
        raise NotImplementedError

    def route_args(self, side: Side) -> tuple[str, ...]:
        """Arguments named ``route_arg_names``, once per route."""
        return ()

    def method_args(self, side: Side, method: str) -> tuple[str, ...]:
        """Arguments named ``method_arg_names``, once per route and method."""
        return ()

    def varies_per_request(self, side: Side) -> bool:
        """Whether ``request_args`` depend on the request on a route with ``side``; if
        not, they are computed once (with ``resource`` None)."""
        return bool(self.request_arg_names)

    def request_args(self, side: Side, resource: str | None) -> tuple[str, ...]:
        """Arguments named ``request_arg_names``: ``resource`` is the request's when read
        ("" for none), None when not read yet. Per request: keep it cheap."""
        return ()

    def decode(self, status: str, notes: Sequence[Any], values: Sequence[Any]) -> Any:
        """The typed value of a refusal: from this policy's notes on the reply (``notes``,
        ``note_names``) and the values after its status (as many as ``refusals`` says)."""
        return None

    def refusal(self, status: str, refused: Any, side: Side, asked: Asked) -> Refusal:
        """The answer to a request this policy refused with ``status``."""
        raise NotImplementedError
