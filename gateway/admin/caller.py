"""Who is calling the management API, and what it may do."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.credentials import extract
from gateway.errors import Outcome, problem
from gateway.policies.scopes import ORG_ADMIN, grants, is_privileged
from gateway.store.keystore import AuthResult
from gateway.store.record import KeyRecord

from .context import SETTINGS, STORE

_DENIED = {
    "not_found": (Outcome.INVALID_KEY, "the API key is not valid"),
    "expired": (Outcome.EXPIRED, "the API key has expired"),
    "disabled": (Outcome.DISABLED, "the API key is disabled"),
}


class Denied(Exception):
    """Raised by handlers to end a request with a prepared problem response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.reason)
        self.response = response


@dataclass(frozen=True, slots=True)
class Caller:
    record: KeyRecord
    now_ms: int

    @property
    def org_admin(self) -> bool:
        return grants(self.record.scopes, ORG_ADMIN)

    @property
    def scopes(self) -> tuple[str, ...]:
        # An org admin manages every key; apikeys:* is implied.
        return (*self.record.scopes, "apikeys:*") if self.org_admin else self.record.scopes

    @property
    def visible_workspace(self) -> str | None:
        """The one workspace this caller sees, or None for all (org admin)."""
        return None if self.org_admin else self.record.workspace_id

    def require_workspace(self, workspace_id: str) -> None:
        if not self.org_admin and workspace_id != self.record.workspace_id:
            raise Denied(
                problem(
                    Outcome.FORBIDDEN, "workspace_id: another workspace needs the org:admin scope"
                )
            )

    def require_grantable(self, scopes: tuple[str, ...]) -> None:
        """Privileged scopes (``*``, ``apikeys:*``, ``org:*``) only if the caller holds them:
        no key can mint or take over a key more powerful than itself."""
        beyond = [s for s in scopes if is_privileged(s) and not grants(self.scopes, s)]
        if beyond:
            raise Denied(
                problem(
                    Outcome.FORBIDDEN,
                    f"scopes: cannot grant {', '.join(beyond)}, which the caller lacks",
                )
            )


async def authorize(request: web.Request, needed: str) -> Caller:
    """Authenticate the request's key and require ``needed``; raises Denied otherwise."""
    settings = request.app[SETTINGS]
    found = extract(
        request.headers, request.query, settings.keys.sources, settings.keys.query_param
    )
    if found.secret is None:
        raise Denied(problem(found.outcome, found.detail))
    result: AuthResult = await request.app[STORE].authenticate(found.secret)
    if result.status != "ok" or result.record is None:
        outcome, detail = _DENIED[result.status]
        raise Denied(problem(outcome, detail))
    caller = Caller(result.record, result.now_ms)
    if not grants(caller.scopes, needed):
        raise Denied(
            problem(
                Outcome.FORBIDDEN_SCOPE, f"this operation needs the {needed} scope", scope=needed
            )
        )
    return caller
