"""What an LLM answer cost, read from its usage block (a route's ``cost: {llm: ...}``).

``openai``: Chat Completions, Completions, Embeddings (``usage.prompt_tokens``,
``completion_tokens``, ``prompt_tokens_details.cached_tokens``,
``completion_tokens_details.reasoning_tokens``) and Responses (``usage.input_tokens``,
``output_tokens``, ``input_tokens_details.cached_tokens``,
``output_tokens_details.reasoning_tokens``); streamed, the chunk carrying ``usage`` (Chat
Completions with ``include_usage``) or ``response.completed``'s ``response.usage``.
``anthropic``: Messages (``usage.input_tokens`` plus ``cache_read_input_tokens`` and
``cache_creation_input_tokens``, ``output_tokens``); streamed, ``message_start``'s usage
updated by each ``message_delta``'s (cumulative).

The model priced is the one the answer names, else the request's. A stream that ends
before its usage arrived (cut short, or an upstream that sends none) is estimated: input
tokens are the provider's if it sent them, else the request body's bytes /
``CHARS_PER_TOKEN``; output tokens are the provider's running count if it sent one, else
the characters of the text deltas already seen (content, reasoning, tool-call arguments) /
``CHARS_PER_TOKEN``; both rounded up; ``usage.estimated`` is True.

Anthropic's one-hour cache writes (``cache_creation.ephemeral_1h_input_tokens``) count as
cache writes at the model's cache-write price: ``TokenUsage`` does not tell them apart.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from decimal import Decimal

from gateway.config.model import LlmApi
from gateway.policies.cost import MAX_CREDITS, JsonMeter
from gateway.policies.llm_usage import CHARS_PER_TOKEN, LlmRequest, TokenUsage
from gateway.policies.prices import PriceBook, cost_micro
from gateway.store.record import MICRO

_MAX_MICRO = MAX_CREDITS * MICRO
# Usage fields of each API, as keygate counts them (totals; see gateway/policies/llm_usage.py).
_Counts = dict[str, int]
# The events after which an OpenAI Responses stream carries its final usage.
_RESPONSE_DONE = frozenset(("response.completed", "response.incomplete", "response.failed"))
# Responses stream events whose "delta" is generated text.
_RESPONSE_DELTAS = frozenset(
    (
        "response.output_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.refusal.delta",
    )
)


class LlmMeter(JsonMeter):
    """The cost of one LLM answer at its model's price (``book``, catalogue ``provider``).

    The body is read as ``JsonMeter`` reads it (same bounds; gzip or deflate inflated; a
    ``text/event-stream`` event by event, an oversized event skipped). ``result`` sets
    ``usage`` whenever the answer told or a stream could be estimated, and returns None
    with ``problem`` when the model has no price or a whole (non-streamed) answer carried
    no usage.
    """

    __slots__ = (
        "_api",
        "_book",
        "_chars",
        "_counts",
        "_done",
        "_model",
        "_provider",
        "_raw",
        "_request",
        "_status",
    )

    def __init__(
        self, api: LlmApi, book: PriceBook, provider: str | None, request: LlmRequest
    ) -> None:
        super().__init__("usage", Decimal(1))
        self._api = api
        self._book = book
        self._provider = provider
        self._request = request
        self._model: str | None = None  # as the answer names it
        self._counts: _Counts | None = None  # the provider's usage so far
        self._done = False  # the usage is final: the stream's last usage event arrived
        self._chars = 0  # of generated text seen in a stream
        self._raw: dict[str, object] = {}  # an Anthropic stream's usage fields so far
        self._status = 0

    def see_headers(self, status: int, headers: Mapping[str, str]) -> None:
        self._status = status
        super().see_headers(status, headers)

    def result(self) -> int | None:
        if self._inflate is not None and self.needs_body:
            try:
                self._take(self._inflate.flush())  # what zlib still held back
            except zlib.error:
                self._stop("the compressed body is corrupt")
        if self.problem is None and self._events is None:
            self._read_whole()
        usage = None if self.problem is not None else self._usage()
        if usage is None and self._status >= 400:
            # The API refused the request (its error shape carries no usage): providers
            # bill no tokens for that, so neither does keygate, whatever was reserved.
            self.problem = None
            return 0
        if self.problem is not None:
            return None
        if usage is None:
            self.problem = "the response carried no usage"
            return None
        self.usage = usage
        price = self._book.price_of(usage.model, self._provider)
        if price is None:
            self.problem = f"model {usage.model or '(none named)'} has no price"
            return None
        micro = cost_micro(price, usage)
        if micro > _MAX_MICRO:
            self.problem = f"the cost of {usage.model} is too large"
            return None
        return micro

    def _read_whole(self) -> None:
        if not self._body:
            self.problem = "the body is empty"
            return
        try:
            document = _parse(b"".join(self._body))
        except (ValueError, RecursionError):
            self.problem = "the body is not JSON"
            return
        if not isinstance(document, dict):
            self.problem = "the body is not a JSON object"
            return
        self._model = _text(document.get("model"))
        usage = document.get("usage")
        if isinstance(usage, dict):
            self._counts = _anthropic(usage) if self._api == "anthropic" else _openai(usage)
            self._done = self._counts is not None

    def _usage(self) -> TokenUsage | None:
        model = self._model or self._request.model or ""
        counts = self._counts
        if self._done and counts is not None:
            return _token_usage(model, counts, estimated=False)
        if self._events is None:
            return None  # a whole answer without usage: nothing to estimate from
        counts = dict(counts or {})
        if "input" not in counts:
            counts["input"] = -(-self._request.body_bytes // CHARS_PER_TOKEN)
        if "output" not in counts:
            counts["output"] = -(-self._chars // CHARS_PER_TOKEN)
        return _token_usage(model, counts, estimated=True)

    def _event(self, data: bytearray) -> None:
        if self._done:
            return  # the usage is final; later events change nothing
        if data == b"[DONE]":  # OpenAI's end of stream: any usage seen is final
            self._done = self._counts is not None
            return
        try:
            event = _parse(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        if self._api == "anthropic":
            self._anthropic_event(event)
        elif isinstance(event.get("type"), str):
            self._responses_event(event)
        else:
            self._chat_event(event)

    def _chat_event(self, event: Mapping[str, object]) -> None:
        """A Chat Completions or Completions chunk."""
        self._name_model(event.get("model"))
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._chars += _choice_chars(choice)
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._counts = _openai(usage) or self._counts
            # The include_usage chunk comes last, with no choices; a provider that sends
            # running usage in every chunk is final only then too.
            self._done = self._counts is not None and not choices

    def _responses_event(self, event: Mapping[str, object]) -> None:
        kind = event.get("type")
        if kind in _RESPONSE_DELTAS:
            delta = event.get("delta")
            if isinstance(delta, str):
                self._chars += len(delta)
            return
        response = event.get("response")
        if not isinstance(response, dict):
            return
        self._name_model(response.get("model"))
        usage = response.get("usage")
        if kind in _RESPONSE_DONE and isinstance(usage, dict):
            self._counts = _openai(usage)
            self._done = self._counts is not None

    def _anthropic_event(self, event: Mapping[str, object]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "thinking", "partial_json"):
                    text = delta.get(key)
                    if isinstance(text, str):
                        self._chars += len(text)
        elif kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self._name_model(message.get("model"))
                self._merge_anthropic(message.get("usage"), output=False)
        elif kind == "message_delta":
            self._merge_anthropic(event.get("usage"), output=True)
        elif kind == "message_stop":
            self._done = self._counts is not None and "output" in self._counts

    def _merge_anthropic(self, usage: object, *, output: bool) -> None:
        """message_start's usage counts input (its output_tokens is a placeholder);
        message_delta's fields are cumulative and replace the same fields before."""
        if not isinstance(usage, dict):
            return
        self._raw.update(usage)
        if not output:
            self._raw.pop("output_tokens", None)
        self._counts = _anthropic_parts(self._raw)

    def _name_model(self, value: object) -> None:
        if self._model is None:
            self._model = _text(value)


def _choice_chars(choice: Mapping[str, object]) -> int:
    """Characters of generated text in a streamed choice: a chat delta's content, reasoning
    and tool-call (or legacy function-call) arguments, or a completion's text."""
    text = choice.get("text")
    chars = len(text) if isinstance(text, str) else 0
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return chars
    for key in ("content", "reasoning_content", "reasoning", "refusal"):
        value = delta.get(key)
        if isinstance(value, str):
            chars += len(value)
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        chars += _arguments_chars(function)
    return chars + _arguments_chars(delta.get("function_call"))


def _arguments_chars(function: object) -> int:
    if isinstance(function, dict):
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            return len(arguments)
    return 0


def _openai(usage: Mapping[str, object]) -> _Counts | None:
    """An OpenAI usage block (Chat Completions, Completions, Embeddings or Responses) as
    keygate's counts, or None when it counts no tokens."""
    if "prompt_tokens" in usage:  # Chat Completions, Completions, Embeddings
        inputs, outputs = "prompt_tokens", "completion_tokens"
        in_details, out_details = "prompt_tokens_details", "completion_tokens_details"
    else:  # Responses
        inputs, outputs = "input_tokens", "output_tokens"
        in_details, out_details = "input_tokens_details", "output_tokens_details"
    input_tokens = _count(usage.get(inputs))
    if input_tokens is None:
        return None
    return {
        "input": input_tokens,
        "output": _count(usage.get(outputs)) or 0,
        "cache_read": _count(_at(usage, in_details, "cached_tokens")) or 0,
        "cache_write": _count(_at(usage, in_details, "cache_write_tokens")) or 0,
        "reasoning": _count(_at(usage, out_details, "reasoning_tokens")) or 0,
    }


def _anthropic(usage: Mapping[str, object]) -> _Counts | None:
    counts = _anthropic_parts(usage)
    if "input" not in counts or "output" not in counts:
        return None
    return counts


def _anthropic_parts(usage: Mapping[str, object]) -> _Counts:
    """The counts an Anthropic usage block states: ``input`` only with ``input_tokens``
    (it then totals the cache reads and writes), ``output`` only with ``output_tokens``."""
    counts: _Counts = {}
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    if cache_read is not None:
        counts["cache_read"] = cache_read
    if cache_write is not None:
        counts["cache_write"] = cache_write
    fresh = _count(usage.get("input_tokens"))
    if fresh is not None:
        counts["input"] = fresh + (cache_read or 0) + (cache_write or 0)
    output = _count(usage.get("output_tokens"))
    if output is not None:
        counts["output"] = output
    thinking = _count(_at(usage, "output_tokens_details", "thinking_tokens"))
    if thinking is not None:
        counts["reasoning"] = thinking
    return counts


def _token_usage(model: str, counts: _Counts, *, estimated: bool) -> TokenUsage:
    # A part never exceeds its total, whatever a provider sent.
    total_in = counts.get("input", 0)
    total_out = counts.get("output", 0)
    cache_read = min(counts.get("cache_read", 0), total_in)
    return TokenUsage(
        model=model,
        input=total_in,
        output=total_out,
        cache_read=cache_read,
        cache_write=min(counts.get("cache_write", 0), total_in - cache_read),
        reasoning=min(counts.get("reasoning", 0), total_out),
        estimated=estimated,
    )


def _at(document: Mapping[str, object], key: str, inner: str) -> object:
    value = document.get(key)
    return value.get(inner) if isinstance(value, dict) else None


def _parse(data: bytes | bytearray) -> object:
    # Plain json: token counts are integers, exact without Decimal, and every streamed
    # chunk is parsed (its text counts towards a cut stream's estimate).
    return json.loads(data)


def _count(value: object) -> int | None:
    """A token count: a whole, non-negative JSON number."""
    if type(value) is int and value >= 0:
        return value
    if type(value) is float and value >= 0 and value.is_integer():
        return int(value)
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
