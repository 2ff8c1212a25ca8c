"""The OpenAI wire: endpoints, the engine answer items, usage, SSE, error bodies, headers.

Every layer speaks these shapes (the API writes them, the gateway relays them, the
engines and upstreams produce them), so they live here, below all of them, and nowhere
else. In particular :func:`error_body` is the one place an error body is built, before
the first byte (a JSON answer) and in-band (an SSE event), always with one shape::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None,
               "request_id": str}}

``type`` and ``code`` follow OpenAI: ``invalid_request_error`` for 400/404/413 (and 401,
with ``code: invalid_api_key``), ``permission_error`` for 403, the limited resource
(``requests`` or ``tokens``) for 429 with ``code: rate_limit_exceeded``, ``server_error``
for every 5xx; ``code`` says what exactly happened.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "BACKEND_HEADER",
    "CACHE_HEADER",
    "CACHE_REQUEST_HEADER",
    "DEADLINE_HEADER",
    "DECLINED_HEADER",
    "GATEWAY_HEADER",
    "HANDOFF_HEADER",
    "MODEL_HEADER",
    "REPLICA_HEADER",
    "REQUEST_ID_HEADER",
    "RETRIES_HEADER",
    "ROUTE_HEADER",
    "SSE_DONE",
    "Endpoint",
    "EngineJSON",
    "EngineSSE",
    "aclose_quietly",
    "aclose_stream",
    "cached_tokens_in",
    "dumps",
    "error_body",
    "error_event",
    "error_fields",
    "sse_data_events",
    "usage_in_sse",
    "usage_of",
    "usage_pair",
]

# ---------------------------------------------------------------------------- headers
REQUEST_ID_HEADER = "x-request-id"
"""Request and response header: the request's id (the client's if safe, else a new one)."""
DEADLINE_HEADER = "x-oss-deadline-ms"
"""Client header: the request must start within this many milliseconds, or get 503."""
RETRIES_HEADER = "x-oss-engine-retries"
"""Response header: how many times the request was sent to another engine replica before
its first byte (absent: never)."""
CACHE_REQUEST_HEADER = "x-oss-response-cache"
"""Client header that opts one request in to the response cache (``on``)."""
CACHE_HEADER = "X-OSS-Response-Cache"
"""Response header: ``hit``, ``miss`` or ``skip`` (the response cache)."""
BACKEND_HEADER = "X-OSS-Serving-Backend"
"""Response header: ``local`` or the upstream's name."""
MODEL_HEADER = "X-OSS-Serving-Model"
"""Response header: the model that produced the answer (a local model, or the upstream's)."""
HANDOFF_HEADER = "X-OSS-Serving-Handoff"
"""Response header: why the request was handed off (a ``HandoffReason``)."""
DECLINED_HEADER = "X-OSS-Serving-Handoff-Declined"
"""Response header: why a handoff the policy wanted did not happen: ``<reason>; <cause>``."""
GATEWAY_HEADER = "x-oss-serving-gateway"
"""Response header (``routing.decision_headers``): the gateway replica that routed it."""
REPLICA_HEADER = "x-oss-serving-replica"
"""Response header (``routing.decision_headers``): the engine replica that served it."""
ROUTE_HEADER = "x-oss-serving-route"
"""Response header (``routing.decision_headers``): why that replica (affinity, load, ...)."""

SSE_DONE = "data: [DONE]\n\n"

SERVER_ERROR = "server_error"


class Endpoint(StrEnum):
    """OpenAI endpoints an engine serves."""

    chat = "chat"
    completions = "completions"
    responses = "responses"


@dataclass(frozen=True)
class EngineJSON:
    """A complete JSON answer (or an error) with its HTTP status."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class EngineSSE:
    """One or more server-sent events, verbatim."""

    text: str


def dumps(obj: Any) -> str:
    """Compact JSON, as the engines send it."""
    return json.dumps(obj, separators=(",", ":"))


# ---------------------------------------------------------------------------- errors
def error_body(
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The one OpenAI error body. ``extra`` adds fields after the five (e.g. the upstream)."""
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    error["request_id"] = request_id or "-"
    error.update(extra)
    return {"error": error}


def error_event(body: Mapping[str, Any], *, endpoint: Endpoint | None = None) -> str:
    """An error body as one SSE event (``event: error`` first on ``/v1/responses``)."""
    prefix = "event: error\n" if endpoint is Endpoint.responses else ""
    return f"{prefix}data: {dumps(body)}\n\n"


def error_fields(body: Any) -> tuple[str, str, str | None, str | None] | None:
    """``(message, type, param, code)`` of an OpenAI-like error body, if it is one.

    Accepts ``{"error": {...}}`` and the Responses stream's ``{"type": "error", ...}``.
    """
    if not isinstance(body, Mapping):
        return None
    err = body.get("error")
    if not isinstance(err, Mapping):
        if body.get("type") != "error":
            return None
        err = body
    message = err.get("message")
    kind = err.get("type")
    param = err.get("param")
    code = err.get("code")
    return (
        message if isinstance(message, str) else "",
        kind if isinstance(kind, str) and kind != "error" else SERVER_ERROR,
        param if isinstance(param, str) else None,
        code if isinstance(code, str) else None,
    )


# ---------------------------------------------------------------------------- usage
def usage_pair(usage: Any) -> tuple[int, int] | None:
    """``(prompt, completion)`` tokens of an OpenAI usage object (chat, completions, responses)."""
    if not isinstance(usage, Mapping):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def usage_of(event: Mapping[str, Any]) -> Any:
    """The usage object of an answer, a chunk, or a Responses event (``response.usage``)."""
    usage = event.get("usage")
    if usage is None and isinstance(event.get("response"), Mapping):
        usage = event["response"].get("usage")
    return usage


def cached_tokens_in(usage: Any) -> tuple[int, int] | None:
    """(prompt tokens, cached prompt tokens) of an OpenAI ``usage`` object, if it has them."""
    if not isinstance(usage, Mapping):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, Mapping) else 0
    if not isinstance(prompt, int):
        return None
    return prompt, int(cached or 0)


# ---------------------------------------------------------------------------- SSE
def sse_data_events(text: str) -> list[dict[str, Any]]:
    """The JSON objects of the ``data:`` lines of ``text`` (``[DONE]`` and non-JSON skipped)."""
    out: list[dict[str, Any]] = []
    for line in text.split("\n"):
        if not line.startswith("data:"):
            continue
        raw = line[5:].strip()
        if not raw.startswith("{"):
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def usage_in_sse(text: str) -> tuple[int, int] | None:
    """The last usage pair carried by the events of ``text`` (cheap when there is none)."""
    if '"usage"' not in text:
        return None
    found = None
    for event in sse_data_events(text):
        found = usage_pair(usage_of(event)) or found
    return found


async def aclose_quietly(stream: AsyncIterator[Any] | None) -> None:
    """Close an async iterator if it can be closed; errors while closing are dropped."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def aclose_stream(stream: AsyncIterator[Any] | None) -> None:
    """Close an async iterator if it can be closed; an error while closing propagates."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
