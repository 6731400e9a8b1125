"""The authorize script's policies, in the order they decide (Unkey's order): the one
place a policy is added. Each is one module of this package (gateway/policies/policy.py
says what a policy holds); the script is assembled from them at start-up
(gateway/policies/layout.py, docs/architecture.md "The authorize script")."""

from __future__ import annotations

from functools import cache
from typing import Any

from gateway.policies.concurrency import ConcurrencyPolicy
from gateway.policies.layout import Layout, assemble
from gateway.policies.policy import Policy
from gateway.policies.ratelimit import RateLimitPolicy
from gateway.policies.resource import ResourcePolicy
from gateway.policies.scopes import ScopesPolicy
from gateway.policies.spend import SpendPolicy
from gateway.policies.tokens import TokenLimitPolicy
from gateway.store.scripts import frame_source

AUTHORIZE_POLICIES: tuple[Policy[Any], ...] = (
    ScopesPolicy(),  # 403 insufficient_scope
    ResourcePolicy(),  # 403 resource not allowed (need_resource: read the body first)
    RateLimitPolicy(),  # 429 rate_limited, the draft's headers on every response
    ConcurrencyPolicy(),  # 429 concurrency_limited
    TokenLimitPolicy(),  # 429 token_rate_limited: LLM tokens per window, estimate reserved
    SpendPolicy(),  # 402 spend_limited; reserves the route's reserve
)


@cache
def authorize_layout() -> Layout:
    """The assembled script and its layout, once per process."""
    return assemble(frame_source("authorize"), AUTHORIZE_POLICIES)
