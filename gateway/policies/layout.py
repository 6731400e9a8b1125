"""The authorize script, assembled at start-up from the frame (store/lua/authorize.lua) and
the policies in chain order; and where everything is in its keys, arguments, record
fields and reply, computed here once so that no module holds a position.

Arguments: the frame's per-request ones, then the policies' per-request ones, per-method
ones, then the frame's per-route ones and the policies' per-route ones (policies in chain
order in each group): a request's arguments are ``(*frame's, *route.args(method,
resource))``, where a route has computed all but the per-request ones at start-up.
Reply: the frame's head (``HEAD`` values), every policy's notes in chain order, then for
"ok" the frame's ``written`` and every policy's ok values, for a refusal the refusing
policy's values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.policies.policy import Policy
from gateway.store.names import KeyNames

# The frame's Redis names of the key, first in KEYS order (KEY.<name>): settle.lua's keys,
# in its order, so that a settlement's target is the head of an authorization's keys.
# The policies' own names follow (Policy.keys), in chain order.
FRAME_KEYS = ("record", "usage", "ledger", "entries", "pending")
HINT_SLOTS = 7  # the caller's day hint (gateway/usage/periods.py:day_hint)
# The frame's arguments (ARG.<name>): per request, then per route.
FRAME_REQUEST_ARGS = ("digest", "clock", "hint", *(f"hint+{i}" for i in range(1, HINT_SLOTS)))
FRAME_REQUEST_ARGS += ("entry",)
FRAME_ROUTE_ARGS = ("lease_ms", "on_expiry")
# The record fields the frame reads (FIELD.<name>).
FRAME_FIELDS = (
    "hash",
    "grace_hash",
    "grace_until",
    "disabled",
    "expires_at",
    "id",
    "workspace_id",
    "user_id",
    "scopes",
    "resources",
    "name",
    "workspace_capped",
    "last_used_at",
)
# status, now_ms, id, workspace_id, user_id, scopes, resources, name, workspace capped,
# expired entries charged, expired entries refunded.
IDENTITY = slice(2, 9)
EXPIRED = 9  # expired entries charged, then refunded
HEAD = 11
KEY_STATUSES = ("not_found", "disabled", "expired")  # replies with no notes
SECTIONS = ("state", "prepare", "check", "commit", "note", "ok")
_NAME = re.compile(r"\b(ARG_AT|ARG|FIELD|KEY)\.([A-Za-z_][A-Za-z0-9_]*)")
_SECTION = re.compile(r"^--@([a-z]+)[ \t]*$", re.MULTILINE)
_LOCAL = re.compile(
    r"^local\s+(?:function\s+([A-Za-z_]\w*)|([A-Za-z_][\w\s,]*?)\s*(?:=|$))", re.MULTILINE
)


def _sections(policy: Policy[Any]) -> dict[str, str]:
    """A fragment's sections by name; what comes before the first one belongs to state."""
    found = list(_SECTION.finditer(policy.lua))
    parts: dict[str, str] = {}
    if found and policy.lua[: found[0].start()].strip():
        parts["state"] = policy.lua[: found[0].start()].strip("\n")
    for i, match in enumerate(found):
        name = match.group(1)
        if name not in SECTIONS or (name in parts and name != "state"):
            raise LayoutError(f"policy {policy.name}: section {name} unknown or twice")
        end = found[i + 1].start() if i + 1 < len(found) else len(policy.lua)
        text = policy.lua[match.end() : end].strip("\n")
        parts[name] = f"{parts[name]}\n{text}" if name in parts else text
    if not found:
        raise LayoutError(f"policy {policy.name}: no sections")
    return parts


def _arg_names(policy: Policy[Any]) -> tuple[str, ...]:
    return policy.request_arg_names + policy.method_arg_names + policy.route_arg_names


def _top_locals(source: str) -> list[str]:
    """The names a chunk declares at its top level (lines starting with ``local``)."""
    names: list[str] = []
    for match in _LOCAL.finditer(source):
        if match.group(1):
            names.append(match.group(1))
        else:
            names += [name.strip() for name in match.group(2).split(",")]
    return names


class LayoutError(ValueError):
    """A fragment names what nobody declared, or declares what it never reads."""


@dataclass(frozen=True, slots=True)
class Refuser:
    """Where a refusal's values are, and whose they are."""

    index: int  # the policy's place in the chain
    policy: Policy[Any]
    notes: slice  # the policy's notes in the reply
    values: slice  # the values after its status


@dataclass(frozen=True, slots=True)
class Layout:
    policies: tuple[Policy[Any], ...]
    script: str  # the assembled Lua (lib.lua is not in it)
    keys: tuple[str, ...]  # KEY names, in KEYS order (a policy's qualified: "rate_limit.rate")
    args: tuple[str, ...]  # qualified ARG names ("entry", "scopes.needed"), in ARGV order
    fields: tuple[str, ...]  # record fields, in HMGET order
    notes: dict[str, slice]  # policy name -> its notes in every reply but a key's
    written: int  # where an "ok" reply says whether a ledger entry was written
    ok: dict[str, int]  # "policy.value" -> where an "ok" reply holds it
    refusers: dict[str, Refuser]  # status -> who refused and where its values are
    bound: dict[str, dict[str, str]]  # policy name -> its sections, names bound

    def key_names(self, names: KeyNames, key_id: str, route: str) -> tuple[str, ...]:
        """Every Redis name the script takes for key ``key_id`` on route ``route``, in
        KEYS order (the proxy builds the same inline, per request)."""
        frame = (
            names.record(key_id),
            names.usage(key_id, ""),
            names.ledger(key_id),
            names.ledger_entries(key_id),
            names.pending_ids(key_id),
        )
        return frame + tuple(k for p in self.policies for k in p.redis_keys(names, key_id, route))

    def arg(self, name: str) -> int:
        """The 0-based position of argument ``name`` ("entry", "spend_caps.reserve")."""
        return self.args.index(name)

    def pack(self, values: Mapping[str, str | int]) -> list[str | int]:
        """Every argument in ARGV order from qualified names, "" for one not given (for
        tests and tools; the proxy builds its arguments without a dict)."""
        unknown = set(values) - set(self.args)
        if unknown:
            raise LayoutError(f"no such arguments: {sorted(unknown)}")
        return [values.get(name, "") for name in self.args]

    def request_part(self, sides: Sequence[Any], resource: str | None) -> tuple[str, ...]:
        """The policies' per-request arguments for a route with ``sides``."""
        out: tuple[str, ...] = ()
        for policy, side in zip(self.policies, sides, strict=True):
            if policy.request_arg_names:
                out += policy.request_args(side, resource)
        return out

    def route_part(
        self, sides: Sequence[Any], method: str, lease_ms: str, on_expiry: str
    ) -> tuple[str, ...]:
        """Every argument after the per-request ones, for a route with ``sides`` and a
        request with ``method`` (computed once per route and method)."""
        out: tuple[str, ...] = ()
        for policy, side in zip(self.policies, sides, strict=True):
            values = policy.method_args(side, method)
            assert len(values) == len(policy.method_arg_names), policy.name
            out += values
        out += (lease_ms, on_expiry)
        for policy, side in zip(self.policies, sides, strict=True):
            values = policy.route_args(side)
            assert len(values) == len(policy.route_arg_names), policy.name
            out += values
        return out


def assemble(frame: str, policies: Sequence[Policy[Any]]) -> Layout:
    """The script and its layout; raises LayoutError for a name bound to nothing."""
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise LayoutError(f"a policy name twice: {names}")
    fields: list[str] = list(FRAME_FIELDS)
    for policy in policies:
        fields += [name for name in policy.fields if name not in fields]
    keys = list(FRAME_KEYS)
    for policy in policies:
        keys += [f"{policy.name}.{name}" for name in policy.keys]
    args = list(FRAME_REQUEST_ARGS)
    for policy in policies:
        args += [f"{policy.name}.{name}" for name in policy.request_arg_names]
    for policy in policies:
        args += [f"{policy.name}.{name}" for name in policy.method_arg_names]
    args += FRAME_ROUTE_ARGS
    for policy in policies:
        args += [f"{policy.name}.{name}" for name in policy.route_arg_names]

    frame_args = FRAME_REQUEST_ARGS + FRAME_ROUTE_ARGS

    def bind(source: str, owner: Policy[Any] | None) -> str:
        """``source`` with every name bound; a policy reads its own fields and arguments,
        and the frame's arguments (e.g. ARG_AT.hint), never another policy's."""
        own_fields = FRAME_FIELDS if owner is None else owner.fields
        own_args = () if owner is None else _arg_names(owner)
        where = "the frame" if owner is None else f"policy {owner.name}"

        def one(match: re.Match[str]) -> str:
            kind, name = match.group(1), match.group(2)
            if kind == "KEY":
                if owner is not None and name in owner.keys:
                    return f"KEYS[{keys.index(f'{owner.name}.{name}') + 1}]"
                if name not in FRAME_KEYS:
                    raise LayoutError(f"{where}: KEY.{name} is neither its own nor the frame's")
                return f"KEYS[{FRAME_KEYS.index(name) + 1}]"
            if kind == "FIELD":
                if name not in own_fields:
                    raise LayoutError(f"{where}: FIELD.{name} is not in its fields")
                return f"f[{fields.index(name) + 1}]"
            if owner is not None and name in own_args:
                at = args.index(f"{owner.name}.{name}") + 1
            elif name in frame_args:
                at = args.index(name) + 1
            else:
                raise LayoutError(f"{where}: ARG.{name} is not one of its arguments")
            return str(at) if kind == "ARG_AT" else f"ARGV[{at}]"

        return _NAME.sub(one, source)

    for policy in policies:  # what a policy declares, it reads
        used = {(m.group(1), m.group(2)) for m in _NAME.finditer(policy.lua)}
        for name in policy.keys:
            if ("KEY", name) not in used:
                raise LayoutError(f"policy {policy.name}: declares KEY.{name}, never reads it")
        for name in policy.fields:
            if ("FIELD", name) not in used:
                raise LayoutError(f"policy {policy.name}: declares FIELD.{name}, never reads it")
        for name in _arg_names(policy):
            if ("ARG", name) not in used and ("ARG_AT", name) not in used:
                raise LayoutError(f"policy {policy.name}: declares ARG.{name}, never reads it")

    frame_locals = set(_top_locals(frame))
    sections: dict[str, dict[str, str]] = {}
    declared: dict[str, str] = {}  # a fragment's top-level local -> its policy
    for policy in policies:
        parts = _sections(policy)
        if bool(policy.note_names) != ("note" in parts):
            raise LayoutError(f"policy {policy.name}: a note section and note_names go together")
        if bool(policy.ok_names) != ("ok" in parts):
            raise LayoutError(f"policy {policy.name}: an ok section and ok_names go together")
        for name in _top_locals(parts.get("state", "")):
            if name in frame_locals or name in declared:
                raise LayoutError(f"policy {policy.name}: local {name} is taken")
            declared[name] = policy.name
        sections[policy.name] = {part: bind(text, policy) for part, text in parts.items()}

    def blocks(part: str) -> list[str]:
        """A section of every policy that has it, in chain order, each in its own block."""
        return [
            f"do -- {p.name}\n{sections[p.name][part]}\nend"
            for p in policies
            if part in sections[p.name]
        ]

    def note_values(admitted: str) -> tuple[list[str], str]:
        lines, values = [], []
        for policy in policies:
            if policy.note_names:
                local = [f"n_{policy.name}_{i}" for i in range(len(policy.note_names))]
                lines.append(f"local {', '.join(local)} = note_{policy.name}({admitted})")
                values += local
        return lines, "".join(f", {v}" for v in values)

    notes: dict[str, slice] = {}
    at = HEAD
    for policy in policies:
        notes[policy.name] = slice(at, at + len(policy.note_names))
        at += len(policy.note_names)
    written = at
    ok: dict[str, int] = {}
    ok_values: list[str] = []
    at = written + 1
    for policy in policies:
        if policy.ok_names:
            ok_values.append(sections[policy.name]["ok"].strip())
            for name in policy.ok_names:
                ok[f"{policy.name}.{name}"] = at
                at += 1
    refusers: dict[str, Refuser] = {}
    for index, policy in enumerate(policies):
        for status, width in policy.refusals:
            if status in refusers or status in KEY_STATUSES or status == "ok":
                raise LayoutError(f"policy {policy.name}: status {status} is taken")
            if f"refuse('{status}'" not in policy.lua:
                raise LayoutError(f"policy {policy.name}: never refuses with {status}")
            refusers[status] = Refuser(
                index, policy, notes[policy.name], slice(written, written + width)
            )

    refuse_lines, refuse_notes = note_values("false")
    middle = "\n".join(
        [
            *(
                f"-- {p.name}\n{sections[p.name]['state']}"
                for p in policies
                if "state" in sections[p.name]
            ),
            *(
                f"local function note_{p.name}(admitted)\n{sections[p.name]['note']}\nend"
                for p in policies
                if "note" in sections[p.name]
            ),
            "local function refuse(status, ...)",
            *refuse_lines,
            f"  return reply(status{refuse_notes}, ...)",
            "end",
            *blocks("prepare"),
            *blocks("check"),
        ]
    )
    ok_note_lines, ok_notes = note_values("true")
    ending = "\n".join(
        [
            *ok_note_lines,
            f"return reply('ok'{ok_notes}, written{''.join(f', {v}' for v in ok_values)})",
        ]
    )
    script = bind(frame, None)
    script = script.replace("FIELD_NAMES", ", ".join(f"'{name}'" for name in fields))
    # Settlements that ride along follow the layout's arguments (the frame says why).
    script = script.replace("ARG_COUNT", str(len(args)))
    for marker, text in (
        ("--@policies", middle),
        ("--@commit", "\n".join(blocks("commit"))),
        ("--@ok", ending),
    ):
        if script.count(marker) != 1:
            raise LayoutError(f"the frame needs one {marker} line")
        script = script.replace(marker, text)
    return Layout(
        tuple(policies),
        script,
        tuple(keys),
        tuple(args),
        tuple(fields),
        notes,
        written,
        ok,
        refusers,
        sections,
    )
