"""Outcomes and the one mapping from an outcome to status, headers and body (docs/architecture.md).

Denials are values (``Outcome``), not exceptions; this module alone turns one into an HTTP
response, as an RFC 9457 problem or in OpenAI's error shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Literal

from aiohttp import web

ErrorFormat = Literal["problem", "openai", "anthropic"]
PROBLEM_TYPE = "application/problem+json"
REALM = 'Bearer realm="keygate"'


class Outcome(Enum):
    """Every way a request can end; the value is the ``code`` in error bodies and metrics."""

    OK = "ok"
    MISSING_KEY = "missing_key"
    INVALID_KEY = "invalid_key"
    EXPIRED = "expired"
    DISABLED = "disabled"
    FORBIDDEN_SCOPE = "forbidden_scope"
    FORBIDDEN_RESOURCE = "forbidden_resource"
    UNPRICED_MODEL = "unpriced_model"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY_LIMITED = "concurrency_limited"
    TOKEN_RATE_LIMITED = "token_rate_limited"
    SPEND_LIMITED = "spend_limited"
    STORE_ERROR = "store_error"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    INVALID_REQUEST = "invalid_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    HEADERS_TOO_LARGE = "headers_too_large"
    INTERNAL_ERROR = "internal_error"


_STATUS: dict[Outcome, tuple[int, str]] = {
    Outcome.MISSING_KEY: (401, "API key required"),
    Outcome.INVALID_KEY: (401, "Invalid API key"),
    Outcome.EXPIRED: (401, "API key expired"),
    Outcome.DISABLED: (403, "API key disabled"),
    Outcome.FORBIDDEN_SCOPE: (403, "Insufficient scope"),
    Outcome.FORBIDDEN_RESOURCE: (403, "Resource not allowed"),
    Outcome.UNPRICED_MODEL: (403, "Model has no price"),
    Outcome.FORBIDDEN: (403, "Forbidden"),
    Outcome.RATE_LIMITED: (429, "Rate limit exceeded"),
    Outcome.CONCURRENCY_LIMITED: (429, "Too many requests in flight"),
    Outcome.TOKEN_RATE_LIMITED: (429, "Token rate limit exceeded"),
    Outcome.SPEND_LIMITED: (402, "Spending limit reached"),
    Outcome.STORE_ERROR: (503, "Key store unavailable"),
    Outcome.UPSTREAM_ERROR: (502, "Upstream unreachable"),
    Outcome.UPSTREAM_TIMEOUT: (504, "Upstream timed out"),
    Outcome.NOT_FOUND: (404, "Not found"),
    Outcome.METHOD_NOT_ALLOWED: (405, "Method not allowed"),
    Outcome.CONFLICT: (409, "Conflict"),
    Outcome.INVALID_REQUEST: (400, "Invalid request"),
    Outcome.PAYLOAD_TOO_LARGE: (413, "Request body too large"),
    Outcome.UNSUPPORTED_MEDIA_TYPE: (415, "Unsupported media type"),
    Outcome.HEADERS_TOO_LARGE: (431, "Request headers too large"),
    Outcome.INTERNAL_ERROR: (500, "Internal error"),
}
# Anthropic's error types by status (its API's errors page).
_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
_OPENAI_TYPE = {
    401: "authentication_error",
    403: "permission_error",
    402: "insufficient_quota",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
    404: "not_found_error",
}


def _auth_challenge(outcome: Outcome, scope: str | None) -> str | None:
    if outcome is Outcome.MISSING_KEY:
        return REALM
    if outcome in (Outcome.INVALID_KEY, Outcome.EXPIRED):
        return f'{REALM}, error="invalid_token"'
    if outcome is Outcome.FORBIDDEN_SCOPE:
        return f'{REALM}, error="insufficient_scope"' + (f', scope="{scope}"' if scope else "")
    return None


def problem(
    outcome: Outcome,
    detail: str,
    *,
    errors: Sequence[Mapping[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
    scope: str | None = None,
    error_format: ErrorFormat = "problem",
    extra: Mapping[str, object] | None = None,
) -> web.Response:
    """The response for a denial or error: status, headers and body, nothing else.

    ``extra`` adds members to the body (RFC 9457 extension members; inside ``error`` in
    OpenAI's shape), e.g. the spending cap that refused a request."""
    status, title = _STATUS[outcome]
    out_headers = dict(headers or {})
    challenge = _auth_challenge(outcome, scope)
    if challenge is not None:
        out_headers["WWW-Authenticate"] = challenge
    if outcome is Outcome.STORE_ERROR:
        out_headers.setdefault("Retry-After", "1")
    if error_format == "openai":
        body: dict[str, object] = {
            "error": {
                "message": detail,
                "type": _OPENAI_TYPE.get(status, "invalid_request_error"),
                "code": outcome.value,
                **(extra or {}),
            }
        }
        content_type = "application/json"
    elif error_format == "anthropic":
        body = {
            "type": "error",
            "error": {
                "type": _ANTHROPIC_TYPE.get(status, "api_error"),
                "message": detail,
                "code": outcome.value,
                **(extra or {}),
            },
        }
        content_type = "application/json"
    else:
        body = {
            "type": f"urn:keygate:error:{outcome.value}",
            "title": title,
            "status": status,
            "detail": detail,
            "code": outcome.value,
        }
        if errors:
            body["errors"] = [dict(e) for e in errors]
        if extra:
            body.update(extra)
        content_type = PROBLEM_TYPE
    return web.Response(
        status=status, headers=out_headers, content_type=content_type, text=json.dumps(body)
    )


def invalid(errors: Sequence[tuple[str, str]]) -> web.Response:
    """400 for invalid input: the detail names the first field, ``errors`` lists all."""
    field, message = errors[0]
    return problem(
        Outcome.INVALID_REQUEST,
        f"{field}: {message}",
        errors=[{"field": f, "detail": m} for f, m in errors],
    )
