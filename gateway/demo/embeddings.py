"""The sample upstream's OpenAI Embeddings API: ``POST /v1/embeddings``.

One vector per input, derived from the input's SHA-256 (the same input always embeds the
same), ``dimensions`` long (default DEFAULT_DIMENSIONS), as floats or, with
``encoding_format: base64`` (the openai SDK's default), as little-endian float32 in base64.
The usage counts are in ``gateway.demo.llm_usage``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

from aiohttp import web

from gateway.demo.chat import openai_error, read_openai_request
from gateway.demo.llm_usage import (
    InvalidRequest,
    embedding_inputs,
    embeddings_usage,
    plan_embeddings,
)

DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096


def embed(value: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit-free vector in [-1, 1) for one input."""
    seed = hashlib.sha256(repr(value).encode()).digest()
    stream = b"".join(
        hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(dimensions // 16 + 1)
    )
    return [(b - 128) / 128 for b in stream[:dimensions]]


def _dimensions(body: dict[str, Any]) -> int:
    value = body.get("dimensions", DEFAULT_DIMENSIONS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSIONS:
        raise InvalidRequest(
            f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}", "dimensions", "invalid"
        )
    return value


def _encoded(vector: list[float], encoding: object) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: a ``list`` of ``embedding`` objects and the usage."""
    try:
        body, answer, _ = await read_openai_request(request, plan_embeddings)
        dimensions = _dimensions(body)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise InvalidRequest(
                "encoding_format must be 'float' or 'base64'", "encoding_format", "invalid"
            )
    except InvalidRequest as error:
        return openai_error(error)
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(embed(v, dimensions), encoding)}
        for i, v in enumerate(embedding_inputs(body))
    ]
    result = {
        "object": "list",
        "data": data,
        "model": answer.model,
        "usage": embeddings_usage(answer),
    }
    return web.json_response(result)
