"""The tenant's caps on one request, applied before anything may spend capacity.

The pipeline (``service.py``, stage 3) calls these in order: the start deadline, the
output cap (filled in when absent, 400 when exceeded), and the token estimate charged
to the tenant's tokens-per-minute bucket (corrected from real usage when the request
ends, see ``flight.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serving.config import QueueConfig
from serving.gateway.context import RequestContext
from serving.gateway.errors import InvalidRequestError
from serving.wire import DEADLINE_HEADER, Endpoint, dumps

__all__ = ["DEFAULT_OUTPUT_ESTIMATE", "OUTPUT_FIELDS", "apply_output_cap", "deadline_of", "estimate_tokens"]

OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
DEFAULT_OUTPUT_ESTIMATE = 256
"""Output tokens assumed for the per-minute token charge when a request names no limit."""


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


def apply_output_cap(ctx: RequestContext) -> None:
    """The tenant's ``max_output_tokens``: fill it in when absent, reject a larger ask."""
    cap = ctx.tenant.limits.max_output_tokens
    if cap is None:
        return
    present = [f for f in OUTPUT_FIELDS if ctx.body.get(f) is not None]
    for name in present:
        if int(ctx.body[name]) > cap:
            raise InvalidRequestError(
                f"{name} is {ctx.body[name]}, above this tenant's limit of {cap} output tokens",
                param=name,
                code="max_tokens_over_limit",
            )
    if not present:
        field_name = "max_output_tokens" if ctx.endpoint is Endpoint.responses else "max_tokens"
        ctx.body[field_name] = cap


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Prompt estimate (4 characters a token) plus the output limit, for the tokens-per-minute charge."""
    prompt_chars = sum(len(dumps(body[k])) for k in ("messages", "prompt", "input") if k in body)
    output = next((int(body[f]) for f in OUTPUT_FIELDS if body.get(f) is not None), DEFAULT_OUTPUT_ESTIMATE)
    return prompt_chars // 4 + output
