"""The tenant's caps on one request, applied before anything may spend capacity.

The pipeline (``service.py``, stage 3) calls :func:`deadline_of`, then
:meth:`RequestLimits.apply`, which in order:

1. **fan-out**: ``n`` / ``best_of`` at most the tenant's ``max_n``, a completions prompt
   list at most ``max_prompts`` long, ``min_tokens`` and ``ignore_eos`` only where the
   tenant allows them; 400 ``fan_out_over_limit`` (``parameter_not_allowed`` for the two
   flags) naming the parameter;
2. **output cap**: an output limit above the tenant's ``max_output_tokens`` is a 400
   ``max_tokens_over_limit``; a missing one is filled in, with the tenant's
   ``max_output_tokens``, else the model's ``default_max_tokens``, bounded by what the
   model's context leaves after the prompt. Every request then has a bounded output, on
   the local engines and on an upstream alike;
3. **cost**: the request runs ``sequences = max(n, best_of) x prompts`` sequences. Its
   token estimate (the tokens-per-minute pre-charge, corrected from real usage when the
   request ends, see ``flight.py``) is the prompt estimate plus the output limit times
   ``sequences``, and its admission lease weighs ``sequences`` slots.

Streamed output is counted by :func:`streamed_tokens` for the charge of a stream that
ends without usage (see ``Flight``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.config import ModelConfig, QueueConfig
from serving.gateway.context import RequestContext
from serving.gateway.errors import InvalidRequestError
from serving.wire import DEADLINE_HEADER, Endpoint, dumps, sse_data_events, usage_pair

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_MAX_TOKENS",
    "OUTPUT_FIELDS",
    "PROMPT_FIELDS",
    "Cost",
    "RequestLimits",
    "UsageText",
    "check_fan_out",
    "deadline_of",
    "estimate_tokens",
    "fan_out",
    "output_limit",
    "prompt_tokens",
    "streamed_tokens",
    "strip_usage",
    "wants_usage",
]

OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "tools")
"""Body fields whose text the model reads (the prompt estimate counts their JSON)."""
CHARS_PER_TOKEN = 4.0
"""Characters per token of the tokens-per-minute prompt estimate."""
DEFAULT_MAX_TOKENS = 4096
"""Output limit filled in for a model without a configuration (``ModelConfig.default_max_tokens``)."""

FAN_OUT = "fan_out_over_limit"
NOT_ALLOWED = "parameter_not_allowed"


@dataclass(frozen=True)
class Cost:
    """What one request may spend, as stage 3 priced it."""

    sequences: int
    """Sequences it runs: ``max(n, best_of) x prompts`` (its lease weighs as many slots)."""
    output_tokens: int
    """Output tokens it may produce: its output limit times ``sequences``."""
    tokens: int
    """The estimate charged to the tenant's tokens per minute: prompt plus ``output_tokens``."""


def deadline_of(ctx: RequestContext, queue: QueueConfig) -> float | None:
    """The request's start deadline: header ``X-Oss-Deadline-Ms``, else the configured default."""
    raw = ctx.headers.get(DEADLINE_HEADER)
    if raw is None:
        return queue.default_deadline_s
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequestError(
            f"{DEADLINE_HEADER} must be a number of milliseconds", param=DEADLINE_HEADER, code="invalid_value"
        ) from None
    if not 0 < value <= 86_400_000:
        raise InvalidRequestError(
            f"{DEADLINE_HEADER} must be between 1 and 86400000", param=DEADLINE_HEADER, code="invalid_value"
        )
    return value / 1000


# ------------------------------------------------------------------ reading a body
def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def fan_out(body: Mapping[str, Any]) -> tuple[int, int]:
    """``(choices per prompt, prompts)``: ``max(n, best_of)``, and the length of a
    completions prompt list (a string, or one list of token ids, is one prompt)."""
    choices = max(_count(body.get("n")), _count(body.get("best_of")))
    prompt = body.get("prompt")
    prompts = 1
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        prompts = len(prompt)
    return choices, prompts


def output_limit(body: Mapping[str, Any]) -> int | None:
    """The request's output limit per sequence (the largest field it sets), or None."""
    values = [int(body[f]) for f in OUTPUT_FIELDS if body.get(f) is not None]
    return max(values) if values else None


def prompt_tokens(body: Mapping[str, Any], chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """The prompt's tokens, estimated from the characters of its JSON."""
    chars = sum(len(dumps(body[k])) for k in PROMPT_FIELDS if body.get(k) is not None)
    return math.ceil(chars / chars_per_token)


def estimate_tokens(body: Mapping[str, Any], chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Prompt estimate plus the output limit times the sequences the request runs."""
    choices, prompts = fan_out(body)
    return prompt_tokens(body, chars_per_token) + (output_limit(body) or 0) * choices * prompts


# ------------------------------------------------------------------ the stage
class RequestLimits:
    """Stage 3's caps (see the module docstring), with each model's output default.

    ``chars_per_token`` estimates the prompt when the output limit filled in is bounded by
    the context; it is the handoff's (``handoff.chars_per_token``), so a request whose
    limit was filled in is never escalated for a context it fits in.
    """

    def __init__(self, models: Iterable[ModelConfig] = (), *, chars_per_token: float = 3.0) -> None:
        self._models = {m.name: m for m in models}
        self._chars_per_token = chars_per_token

    def apply(self, ctx: RequestContext) -> Cost:
        """Check fan-out and the output cap, fill in a missing output limit, price the request."""
        check_fan_out(ctx)
        per_sequence = self._output_cap(ctx)
        choices, prompts = fan_out(ctx.body)
        sequences = choices * prompts
        output = per_sequence * sequences
        return Cost(sequences, output, prompt_tokens(ctx.body) + output)

    def default_output(self, model: str, body: Mapping[str, Any], cap: int | None) -> int:
        """The output limit of a request that names none: the tenant's cap, else the model's
        default; at most what the model's context leaves after the prompt (when the prompt
        fits at all: one that does not is escalated, or rejected by the engine)."""
        config = self._models.get(model)
        value = cap or (config.default_max_tokens if config is not None else DEFAULT_MAX_TOKENS)
        context = config.context_tokens if config is not None else None
        if context is not None:
            room = context - prompt_tokens(body, self._chars_per_token)
            if room >= 1:
                value = min(value, room)
        return value

    def _output_cap(self, ctx: RequestContext) -> int:
        cap = ctx.tenant.limits.max_output_tokens
        present = [f for f in OUTPUT_FIELDS if ctx.body.get(f) is not None]
        if cap is not None:
            for name in present:
                if int(ctx.body[name]) > cap:
                    raise InvalidRequestError(
                        f"{name} is {ctx.body[name]}, above this tenant's limit of {cap} output tokens",
                        param=name,
                        code="max_tokens_over_limit",
                    )
        if present:
            return output_limit(ctx.body) or 1
        value = self.default_output(ctx.model, ctx.body, cap)
        ctx.body["max_output_tokens" if ctx.endpoint is Endpoint.responses else "max_tokens"] = value
        return value


def check_fan_out(ctx: RequestContext) -> None:
    """400 when the request fans out beyond the tenant's caps, or sets a flag it may not."""
    limits, body = ctx.tenant.limits, ctx.body
    if limits.max_n is not None:
        for name in ("n", "best_of"):
            value = body.get(name)
            if isinstance(value, int) and value > limits.max_n:
                raise InvalidRequestError(
                    f"{name} is {value}, above this tenant's limit of {limits.max_n} sequences per prompt",
                    param=name,
                    code=FAN_OUT,
                )
    _, prompts = fan_out(body)
    if limits.max_prompts is not None and prompts > limits.max_prompts:
        raise InvalidRequestError(
            f"prompt has {prompts} prompts, above this tenant's limit of {limits.max_prompts}",
            param="prompt",
            code=FAN_OUT,
        )
    if not limits.allow_min_tokens and body.get("min_tokens"):
        raise InvalidRequestError(
            "min_tokens is not allowed for this tenant", param="min_tokens", code=NOT_ALLOWED
        )
    if not limits.allow_ignore_eos and body.get("ignore_eos"):
        raise InvalidRequestError(
            "ignore_eos is not allowed for this tenant", param="ignore_eos", code=NOT_ALLOWED
        )


# ------------------------------------------------------------------ counting a stream
class UsageText(str):
    """Event text that also carries the usage of an event stripped from it on its way to
    the client (the handoff drops the usage chunk it asked the upstream for): the flight
    reads :attr:`usage` for the tenant's charge."""

    usage: tuple[int, int] | None = None

    def __new__(cls, text: str, usage: tuple[int, int] | None) -> UsageText:
        out = super().__new__(cls, text)
        out.usage = usage
        return out


def wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streamed chat/completions request asked for the final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def strip_usage(text: str) -> str:
    """``text`` without the usage the gateway asked for on the client's behalf (the
    usage-only chunk is dropped, a ``usage`` field elsewhere removed): a
    :class:`UsageText` that still carries it for the tenant's charge. Cheap when the
    text carries no usage."""
    if '"usage"' not in text:
        return text
    out: list[str] = []
    found: tuple[int, int] | None = None
    for event in text.split("\n\n"):
        if not event.strip():
            continue
        data = None
        if event.startswith("data:") and '"usage"' in event:
            try:
                data = json.loads(event[5:])
            except ValueError:
                data = None
        if not isinstance(data, dict) or data.get("usage") is None:
            out.append(event + "\n\n")
            continue
        found = usage_pair(data.pop("usage")) or found
        if data.get("choices") == []:
            continue  # the usage-only chunk: the client did not ask for it
        out.append("data: " + dumps(data) + "\n\n")
    return UsageText("".join(out), found)


_DELTA_KEYS = ("content", "reasoning_content", "reasoning", "refusal", "text")


def streamed_tokens(text: str) -> int:
    """Output tokens the events of ``text`` delivered, counted as one per non-empty text
    delta of each choice (chat ``content`` / ``reasoning_content`` / ``reasoning`` /
    ``refusal`` / tool-call arguments, completions ``text``, Responses ``*.delta`` events).

    vLLM and OpenAI send at most one delta per token and choice (an event may carry more
    than one token, never less than one), so the count never exceeds what was delivered:
    it is the floor a stream that ends without usage is charged.
    """
    if "data:" not in text:
        return 0
    count = 0
    for event in sse_data_events(text):
        kind = event.get("type")
        if isinstance(kind, str):  # the Responses API
            if kind.endswith(".delta") and event.get("delta"):
                count += 1
            continue
        choices = event.get("choices")
        if not isinstance(choices, list):
            continue
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            part = delta if isinstance(delta, dict) else choice
            texts = any(isinstance(part.get(k), str) and part.get(k) for k in _DELTA_KEYS)
            if texts or (isinstance(part.get("tool_calls"), list) and part["tool_calls"]):
                count += 1
    return count
