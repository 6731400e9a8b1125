"""Per-request state: the one mutable object of a proxied request (Envoy's filter state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.errors import ErrorFormat, Outcome
from gateway.metrics import NO_ROUTE
from gateway.policies.routing import Match

if TYPE_CHECKING:
    from gateway.policies.limits import RoutePolicy
    from gateway.policies.llm_usage import TokenUsage
    from gateway.proxy.authorize import Decision
    from gateway.proxy.llm import LlmExchange
    from gateway.proxy.workspace import WorkspaceHold


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What the proxy needs of an authorized key (a slice of the record)."""

    id: str
    workspace_id: str
    user_id: str
    scopes: tuple[str, ...]
    resources: tuple[str, ...] | None
    scopes_header: str  # X-Keygate-Scopes, space-separated, built once per distinct value
    name: str | None = None  # for per-key metrics
    # The key's workspace has a budget (the record's workspace_capped flag): the proxy
    # reserves against the workspace's caps too, in a second script on its slot.
    workspace_capped: bool = False


@dataclass(slots=True)
class RequestContext:
    request: web.BaseRequest
    request_id: str
    path: str = ""
    path_is_raw: bool = False  # the raw target needed no normalising: forward it as is
    match: Match | None = None
    secret: str | None = None
    credential_headers: tuple[str, ...] = ()
    credential_in_query: bool = False
    key: KeyIdentity | None = None
    policy: RoutePolicy | None = None
    decision: Decision | None = None  # the authorize script's "ok": what it held, rate state
    workspace: WorkspaceHold | None = None  # its workspace's reservation (proxy/workspace.py)
    body: bytes | None = None  # read only when a rule needs it (resource from JSON, LLM)
    llm: LlmExchange | None = None  # an LLM route's request (gateway/proxy/llm.py)
    usage: TokenUsage | None = None  # an LLM answer's tokens, once settled
    outcome: Outcome = Outcome.OK
    upstream_status: int | None = None  # set when the upstream answered
    responded: bool = False  # the client has the status line: the upstream's work is used
    upstream_s: float | None = None  # the upstream exchange's duration, when forwarded
    charged: int = 0  # micro-units this request cost (settled)
    endpoint: str = NO_ROUTE  # the metrics' route label when no route matched

    @property
    def error_format(self) -> ErrorFormat:
        return self.match.route.error_format if self.match is not None else "problem"
