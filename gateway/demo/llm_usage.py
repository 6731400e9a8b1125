"""The sample upstream's token rules: every LLM answer it gives is planned here, before its
first byte, so a test can compute the exact usage of any request without sending it.

Tokens are words (``str.split()``).

- **Input** counts the words of every text a request carries, with no per-message
  overhead: each chat or Anthropic message's content (a string, or the ``text`` of its
  parts), Anthropic's ``system``, the Responses API's ``instructions`` and ``input``, the
  legacy ``prompt`` (a string or a list of strings), the embeddings ``input`` (strings, or
  token arrays counted by their length).
- **Output** is the reply ``Echo: <the words of the last user message>`` (legacy
  completions: the last prompt), or GREETING when that has no words, at most
  REPLY_MAX_WORDS words. Each word is one streamed text delta (later words carry a leading
  space). Reasoning tokens asked for with ``X-Demo-Reasoning-Tokens`` come first and are
  part of the output tokens. A cap (``max_tokens``, ``max_completion_tokens``,
  ``max_output_tokens``) bounds the output tokens: reasoning first, then as many words as
  fit; an answer that lost anything to the cap ends "length" (Chat, Completions),
  ``incomplete`` with reason ``max_output_tokens`` (Responses) or "max_tokens" (Messages).

Headers a test sends to shape an answer (a bad value is a 400 in the API's error shape):

- ``X-Demo-Cached-Tokens: N``: N input tokens are read from the prompt cache.
- ``X-Demo-Cache-Write-Tokens: N``: N input tokens are written to it (cached plus written
  may not exceed the input tokens).
- ``X-Demo-Reasoning-Tokens: N``: the answer spends N reasoning tokens (OpenAI APIs; the
  Messages API refuses the header).
- ``X-Demo-Delay: S``: seconds between two streamed text deltas (default STREAM_DELAY).
- ``X-Demo-Cut-After: N``: a stream sends its first N text deltas (all of them if it has
  fewer), then the connection is closed mid-body: no finishing event, no usage, no
  terminating chunk.

Usage blocks (``expected_usage`` returns them, equal to what the upstream sends):

- Chat Completions and Completions: ``prompt_tokens`` = input, ``completion_tokens`` =
  output, ``total_tokens``; models named ``demo-*`` stop there, like a bare
  OpenAI-compatible server; every other model adds ``prompt_tokens_details``
  (``cached_tokens``, ``audio_tokens``, and ``cache_write_tokens`` when asked for) and
  ``completion_tokens_details`` (``reasoning_tokens``, ``audio_tokens``,
  ``accepted_prediction_tokens``, ``rejected_prediction_tokens``), as OpenAI does.
- Responses: ``input_tokens`` = input, ``input_tokens_details`` (``cached_tokens``,
  ``cache_write_tokens``), ``output_tokens``, ``output_tokens_details.reasoning_tokens``,
  ``total_tokens``.
- Messages (Anthropic): ``input_tokens`` = input minus cached minus written (Anthropic
  counts them apart), ``cache_read_input_tokens``, ``cache_creation_input_tokens`` (all 5
  minute writes in ``cache_creation``), ``output_tokens``, ``service_tier``.
- Embeddings: ``prompt_tokens`` = ``total_tokens`` = input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Api = Literal["chat", "completions", "responses", "embeddings", "messages"]

STREAM_DELAY = 0.05
"""Seconds between streamed text deltas; a request may override it with ``X-Demo-Delay``."""
MAX_DEMO_DELAY = 10.0
REPLY_MAX_WORDS = 64
GREETING = "Hello from the keygate demo upstream."
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o")
"""OpenAI models genai-prices prices differently (input, output and cached-read prices)."""
ANTHROPIC_MODEL = "claude-3-5-haiku-latest"
"""An Anthropic model genai-prices knows, cache reads and cache writes priced apart."""
EMBEDDING_MODEL = "text-embedding-3-small"
UNPRICED_MODEL = "house-model-7b"
"""A model genai-prices has no price for."""
BARE_USAGE_PREFIX = "demo-"
"""Models named so answer OpenAI usage without details, like vLLM or Ollama."""


class InvalidRequest(Exception):
    """A request the real API would refuse with 400 ``invalid_request_error``."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class DemoControls:
    """What a test asked for in the ``X-Demo-*`` headers."""

    delay: float = STREAM_DELAY
    cut_after: int | None = None
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0


def _count_header(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    if not raw.strip().isdecimal():
        raise InvalidRequest(f"{name} must be a non-negative integer", None, "invalid_value")
    return int(raw)


def read_controls(headers: Mapping[str, str]) -> DemoControls:
    """The ``X-Demo-*`` headers of a request (absent ones take their defaults)."""
    delay = STREAM_DELAY
    raw = headers.get("X-Demo-Delay")
    if raw is not None:
        try:
            delay = float(raw)
        except ValueError:
            delay = -1.0
        if not (math.isfinite(delay) and 0 <= delay <= MAX_DEMO_DELAY):
            raise InvalidRequest(
                f"X-Demo-Delay must be between 0 and {MAX_DEMO_DELAY:g}", None, "invalid_value"
            )
    return DemoControls(
        delay=delay,
        cut_after=_count_header(headers, "X-Demo-Cut-After"),
        cached=_count_header(headers, "X-Demo-Cached-Tokens") or 0,
        cache_write=_count_header(headers, "X-Demo-Cache-Write-Tokens") or 0,
        reasoning=_count_header(headers, "X-Demo-Reasoning-Tokens") or 0,
    )


@dataclass(frozen=True)
class Answer:
    """One planned answer: its token counts and the words it will say."""

    model: str
    input_tokens: int  # every input token, cached and cache-written included
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    words: tuple[str, ...]
    truncated: bool  # the output cap cut the answer short

    @property
    def output_tokens(self) -> int:
        return self.reasoning_tokens + len(self.words)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def deltas(self) -> tuple[str, ...]:
        """The streamed text deltas, in order; they join to ``text``."""
        return tuple(w if i == 0 else f" {w}" for i, w in enumerate(self.words))


def words_in(text: str) -> int:
    return len(text.split())


def reply_words(last_user_text: str) -> tuple[str, ...]:
    said = last_user_text.split()
    words = ("Echo:", *said) if said else tuple(GREETING.split())
    return words[:REPLY_MAX_WORDS]


def plan_answer(
    model: str,
    inputs: Iterable[str],
    reply: tuple[str, ...],
    cap: int | None,
    controls: DemoControls,
    extra_input_tokens: int = 0,
) -> Answer:
    """Count the input and fit reasoning and ``reply`` under the output ``cap``."""
    input_tokens = sum(words_in(t) for t in inputs) + extra_input_tokens
    if controls.cached + controls.cache_write > input_tokens:
        raise InvalidRequest(
            f"X-Demo-Cached-Tokens plus X-Demo-Cache-Write-Tokens exceed the "
            f"{input_tokens} input tokens",
            None,
            "invalid_value",
        )
    reasoning, words = controls.reasoning, reply
    if cap is not None:
        reasoning = min(reasoning, cap)
        words = words[: cap - reasoning]
    return Answer(
        model=model,
        input_tokens=input_tokens,
        cached_tokens=controls.cached,
        cache_write_tokens=controls.cache_write,
        reasoning_tokens=reasoning,
        words=words,
        truncated=(reasoning, words) != (controls.reasoning, reply),
    )


# ------------------------------------------------------------------------ request bodies


def content_text(content: object) -> str:
    """A message's text: a string, or the ``text`` of its parts (other parts count 0)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", None, "invalid_json")
    return body


def require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", "model", "missing_model")
    return model


def output_cap(body: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    """The first of ``names`` the body sets (a positive integer), or None."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"{name} must be a positive integer", name, "invalid_value")
        return value
    return None


def messages_of(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "'messages' must be a non-empty array", "messages", "missing_required_parameter"
        )
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("each message must be an object", "messages", "invalid_type")
    return messages


def last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return content_text(users[-1].get("content")) if users else ""


def plan_chat(body: object, controls: DemoControls) -> Answer:
    """``POST /v1/chat/completions``."""
    body = require_object(body)
    model = require_model(body)
    messages = messages_of(body)
    texts = [content_text(m.get("content")) for m in messages]
    cap = output_cap(body, ("max_completion_tokens", "max_tokens"))
    return plan_answer(model, texts, reply_words(last_user_text(messages)), cap, controls)


def prompts_of(body: Mapping[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise InvalidRequest("'prompt' must be a string or an array of strings", "prompt", "invalid")


def plan_completions(body: object, controls: DemoControls) -> Answer:
    """``POST /v1/completions`` (legacy): the reply answers the last prompt."""
    body = require_object(body)
    model = require_model(body)
    prompts = prompts_of(body)
    cap = output_cap(body, ("max_tokens",))
    return plan_answer(model, prompts, reply_words(prompts[-1]), cap, controls)


def responses_input(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Responses API's ``input`` as message items (a string is one user message)."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if isinstance(raw, list) and all(isinstance(item, dict) for item in raw):
        return raw
    raise InvalidRequest("'input' must be a string or an array of items", "input", "invalid")


def plan_responses(body: object, controls: DemoControls) -> Answer:
    """``POST /v1/responses``."""
    body = require_object(body)
    model = require_model(body)
    items = responses_input(body)
    texts = [content_text(item.get("content")) for item in items]
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    cap = output_cap(body, ("max_output_tokens",))
    return plan_answer(model, texts, reply_words(last_user_text(items)), cap, controls)


def embedding_inputs(body: Mapping[str, Any]) -> list[str | list[int]]:
    raw = body.get("input")
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)
    ):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str | list) for t in raw):
        return raw
    raise InvalidRequest("'input' must be a string or an array", "input", "invalid_type")


def plan_embeddings(body: object, controls: DemoControls) -> Answer:
    """``POST /v1/embeddings``: input only (a token array counts its length)."""
    body = require_object(body)
    model = require_model(body)
    inputs = embedding_inputs(body)
    texts = [i for i in inputs if isinstance(i, str)]
    arrays = sum(len(i) for i in inputs if isinstance(i, list))
    return plan_answer(model, texts, (), None, DemoControls(), extra_input_tokens=arrays)


def plan_messages(body: object, controls: DemoControls) -> Answer:
    """``POST /v1/messages`` (Anthropic): ``max_tokens`` is required."""
    body = require_object(body)
    model = require_model(body)
    if "max_tokens" not in body:
        raise InvalidRequest("max_tokens: Field required", "max_tokens", "missing")
    if controls.reasoning:
        raise InvalidRequest("X-Demo-Reasoning-Tokens is for OpenAI APIs", None, "invalid")
    messages = messages_of(body)
    texts = [content_text(m.get("content")) for m in messages]
    texts.append(content_text(body.get("system")))
    cap = output_cap(body, ("max_tokens",))
    return plan_answer(model, texts, reply_words(last_user_text(messages)), cap, controls)


PLANS = {
    "chat": plan_chat,
    "completions": plan_completions,
    "responses": plan_responses,
    "embeddings": plan_embeddings,
    "messages": plan_messages,
}


# ------------------------------------------------------------------------ usage blocks


def openai_usage(answer: Answer) -> dict[str, Any]:
    """Chat Completions' and Completions' ``usage``."""
    usage: dict[str, Any] = {
        "prompt_tokens": answer.input_tokens,
        "completion_tokens": answer.output_tokens,
        "total_tokens": answer.total_tokens,
    }
    if answer.model.startswith(BARE_USAGE_PREFIX):
        return usage
    prompt_details = {"cached_tokens": answer.cached_tokens, "audio_tokens": 0}
    if answer.cache_write_tokens:
        prompt_details["cache_write_tokens"] = answer.cache_write_tokens
    usage["prompt_tokens_details"] = prompt_details
    usage["completion_tokens_details"] = {
        "reasoning_tokens": answer.reasoning_tokens,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }
    return usage


def responses_usage(answer: Answer) -> dict[str, Any]:
    return {
        "input_tokens": answer.input_tokens,
        "input_tokens_details": {
            "cached_tokens": answer.cached_tokens,
            "cache_write_tokens": answer.cache_write_tokens,
        },
        "output_tokens": answer.output_tokens,
        "output_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
        "total_tokens": answer.total_tokens,
    }


def embeddings_usage(answer: Answer) -> dict[str, Any]:
    return {"prompt_tokens": answer.input_tokens, "total_tokens": answer.input_tokens}


def anthropic_usage(answer: Answer, output_tokens: int | None = None) -> dict[str, Any]:
    """Messages' ``usage``; ``output_tokens`` overrides the count (a stream's start says 1)."""
    return {
        "input_tokens": answer.input_tokens - answer.cached_tokens - answer.cache_write_tokens,
        "cache_creation_input_tokens": answer.cache_write_tokens,
        "cache_read_input_tokens": answer.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": answer.cache_write_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": answer.output_tokens if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }


USAGE_BLOCKS = {
    "chat": openai_usage,
    "completions": openai_usage,
    "responses": responses_usage,
    "embeddings": embeddings_usage,
    "messages": anthropic_usage,
}


def expected_answer(api: Api, body: object, headers: Mapping[str, str] | None = None) -> Answer:
    """The answer the upstream will give ``body`` with these request ``headers``."""
    return PLANS[api](body, read_controls(headers or {}))


def expected_usage(
    api: Api, body: object, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The ``usage`` block the upstream will answer ``body`` with (JSON, or a stream's final
    usage); raises InvalidRequest where the upstream answers 400."""
    return USAGE_BLOCKS[api](expected_answer(api, body, headers))


def expected_deltas(
    api: Api, body: object, headers: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The text deltas a stream of ``body`` sends, in order (before any cut)."""
    return expected_answer(api, body, headers).deltas()
