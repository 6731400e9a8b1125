"""Taking the API key out of a request (DESIGN §3 step 2)."""

from __future__ import annotations

from dataclasses import dataclass

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
    """
    found: list[str] = []
    carriers: list[str] = []
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
    return Extracted(found[0], headers=tuple(dict.fromkeys(carriers)), in_query=bool(params))


def _visible_ascii(value: str) -> bool:
    # Header bytes outside ASCII reach us as other characters; they can be no key's secret.
    return value.isascii() and value.isprintable() and " " not in value
