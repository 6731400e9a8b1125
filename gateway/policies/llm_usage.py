"""What an LLM request asks for and what its answer used: the values the request reader
(gateway/policies/llm_request.py), the usage meter (gateway/policies/llm.py), the price
book (gateway/policies/prices.py) and settlement pass between them.

Token counts follow the providers' totals: ``input`` counts every input token, cached
reads and cache writes included (OpenAI's ``prompt_tokens``; Anthropic's
``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``), ``output``
every output token, reasoning included (OpenAI's ``completion_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Characters per token when tokens must be counted from text (a stream cut before its usage
# arrived): OpenAI's rule of thumb for English, documented in README ("LLM APIs").
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The tokens one answer used, for the model it names."""

    model: str  # as the response names it ("" when it names none)
    input: int = 0  # all input tokens, cached and cache-written included
    output: int = 0  # all output tokens, reasoning included
    cache_read: int = 0  # of input: read from the provider's prompt cache
    cache_write: int = 0  # of input: written to it (Anthropic's cache_creation)
    reasoning: int = 0  # of output
    estimated: bool = False  # counted from a cut stream's text, not the provider's usage


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """What an LLM request's JSON body says, read once before forwarding."""

    model: str | None  # the body's "model" (None: it names none)
    stream: bool  # "stream": true
    max_output_tokens: int | None  # max_tokens / max_completion_tokens / max_output_tokens
    body_bytes: int  # the body's size: the bound of its input tokens (README, "LLM APIs")
    usage_requested: bool  # an OpenAI stream that asked for usage itself (include_usage)
