"""Taking the API key out of a request (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from multidict import MultiMapping

from gateway.errors import Outcome


@dataclass(frozen=True, slots=True)
class Extracted:
    """The presented secret, or the outcome that ends the request (missing, malformed,
    two different credentials), with a detail safe to show: never the secret itself."""

    secret: str | None
    outcome: Outcome = Outcome.OK
    detail: str = ""
    headers: tuple[str, ...] = ()  # the headers that carried it, to hide from upstreams
    in_query: bool = False


MISSING = Extracted(None, Outcome.MISSING_KEY, "no API key in the request")
SECOND_AUTHORIZATION = Extracted(
    None,
    Outcome.INVALID_REQUEST,
    "the request carries an Authorization header besides its API key; send one credential",
)
# The header each source reads the key from.
_CARRIER = {"bearer": "Authorization", "api_key_scheme": "Authorization", "x-api-key": "x-api-key"}


def reads_authorization(sources: tuple[str, ...]) -> bool:
    """Whether keygate takes the key from Authorization under these sources."""
    return "bearer" in sources or "api_key_scheme" in sources


@lru_cache(maxsize=64)
def carrier_headers(sources: tuple[str, ...]) -> tuple[str, ...]:
    """Every header a key may arrive in under these sources: none of them reaches an
    upstream when credentials are hidden, whichever carried this request's key (a second
    spelling of one, ``X_Api_Key``, is dropped with it: see gateway/proxy/headers.py)."""
    return tuple(dict.fromkeys(_CARRIER[s] for s in sources if s in _CARRIER))


def extract(
    headers: MultiMapping[str],
    query: MultiMapping[str] | None,
    sources: tuple[str, ...],
    query_param: str = "api_key",
) -> Extracted:
    """Read every enabled source; two different credentials are refused (400).

    ``query`` may be None when the query is no source: parsing it costs more than the rest.

    Every value counts, not only the first: a repeated header or parameter carrying a
    second key would otherwise slip past the check and reach the upstream unverified.

    Where Authorization is a source, any other Authorization header next to the key (another
    scheme, ``Bearer<TAB>K``, a bare token) is a second credential too: upstreams read
    schemes keygate does not (``Token``, ``Basic``) and split on any whitespace. Alone, such
    a header is no key (401), as before.
    """
    found: list[str] = []
    carriers: list[str] = []
    foreign_authorization = False
    for authorization in headers.getall("Authorization", ()):
        scheme, _, value = authorization.strip().partition(" ")
        kind = scheme.lower()
        if (kind == "bearer" and "bearer" in sources) or (
            kind == "api-key" and "api_key_scheme" in sources
        ):
            value = value.strip()
            if not value or " " in value:
                return Extracted(
                    None,
                    Outcome.INVALID_KEY,
                    f"malformed Authorization header: '{scheme} <key>' expected",
                )
            found.append(value)
            carriers.append("Authorization")
        else:
            foreign_authorization = True
    if "x-api-key" in sources:
        for header in headers.getall("x-api-key", ()):
            if not header.strip():
                return Extracted(None, Outcome.INVALID_KEY, "empty x-api-key header")
            found.append(header.strip())
            carriers.append("x-api-key")
    params = query.getall(query_param, ()) if query is not None and "query" in sources else ()
    found.extend(params)
    if not found:
        return MISSING
    if not all(_visible_ascii(value) for value in found):
        return Extracted(None, Outcome.INVALID_KEY, "API keys are visible ASCII characters")
    if any(value != found[0] for value in found[1:]):
        return Extracted(
            None, Outcome.INVALID_REQUEST, "the request carries two different API keys; send one"
        )
    if foreign_authorization and reads_authorization(sources):
        return SECOND_AUTHORIZATION
    return Extracted(found[0], headers=tuple(dict.fromkeys(carriers)), in_query=bool(params))


def _visible_ascii(value: str) -> bool:
    # Header bytes outside ASCII reach us as other characters; they can be no key's secret.
    return value.isascii() and value.isprintable() and " " not in value
