"""The resource policy: a key restricted to listed resources (model ids, say) may use only
those, on routes that name the request's resource (403 forbidden_resource).

The resource is read from the query or path before the script runs; from a JSON body only
when the key turns out to be restricted (``need_resource``: the proxy reads the body and
asks again), so an unrestricted key's body is never read before forwarding.
"""

from __future__ import annotations

from typing import Any

from gateway.config.model import Route
from gateway.errors import Outcome
from gateway.policies.policy import Asked, Policy, Refusal

NEED_RESOURCE = "need_resource"  # not a refusal: read the body, then authorize again
_NAMES_NONE = ("0", "")  # the route names no resource: not checked


class ResourcePolicy(Policy[bool]):
    name = "resource"
    fields = ("resources",)
    request_arg_names = ("state", "resource")
    refusals = ((NEED_RESOURCE, 0), ("forbidden_resource", 0))
    lua = """
--@check
-- ARG.state: '0' the route names no resource, '1' not read yet, '2' read: ARG.resource
-- ('' when the request names none).
if FIELD.resources and ARG.state ~= '0' then
  if ARG.state == '1' then return refuse('need_resource') end
  local allowed = false
  if ARG.resource ~= '' then
    for _, r in ipairs(cjson.decode(FIELD.resources)) do
      if r == ARG.resource then allowed = true break end
    end
  end
  if not allowed then return refuse('forbidden_resource') end
end
"""

    def route_side(self, route: Route) -> bool:
        """Whether the route names a resource (checked against a key's allow-list)."""
        return route.resource is not None

    def varies_per_request(self, side: bool) -> bool:
        return side

    def request_args(self, side: bool, resource: str | None) -> tuple[str, ...]:
        if not side:
            return _NAMES_NONE
        return ("1", "") if resource is None else ("2", resource)

    def refusal(self, status: str, refused: Any, side: bool, asked: Asked) -> Refusal:
        assert status == "forbidden_resource"  # need_resource is the proxy's to handle
        resource = asked.resource
        if not resource:
            detail = "this key is limited to listed resources and the request names none"
        else:
            detail = f"this key may not use {resource[:200]!r}"
        return Refusal(Outcome.FORBIDDEN_RESOURCE, detail)
