"""Request validation with vLLM's own OpenAI protocol models (nothing re-implemented).

The gateway validates before it spends an engine slot, so a bad request costs no
engine time and its 400 names the offending parameter the way OpenAI does
(``messages[0].content``).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from serving.engine.protocol import Endpoint
from serving.gateway.errors import InvalidRequestError

__all__ = ["parse_json_body", "validate_request"]


def _model_for(endpoint: Endpoint) -> type[BaseModel]:
    if endpoint is Endpoint.chat:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest  # type: ignore[no-any-return]
    if endpoint is Endpoint.completions:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return CompletionRequest  # type: ignore[no-any-return]
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return ResponsesRequest  # type: ignore[no-any-return]


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return data


def param_path(loc: tuple[int | str, ...]) -> str | None:
    """OpenAI-style parameter path from a pydantic error location."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        # pydantic union/validator tags (e.g. "function-after[...]") are not parameters
    return out or None


def validate_request(endpoint: Endpoint, body: dict[str, Any], max_message_chars: int) -> str:
    """Check ``body`` against vLLM's model for ``endpoint``; return the model name."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model", code="missing_model")
    try:
        _model_for(endpoint).model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = param_path(tuple(first["loc"]))
        message = f"Invalid value for '{param}': {first['msg']}" if param else str(first["msg"])
        raise InvalidRequestError(message[:max_message_chars], param=param, code="invalid_value") from None
    except ValueError as exc:  # model validators that raise plain ValueError
        raise InvalidRequestError(str(exc)[:max_message_chars], code="invalid_value") from None
    return model
