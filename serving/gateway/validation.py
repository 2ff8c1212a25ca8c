"""Request parsing and validation with vLLM's own OpenAI protocol models (nothing re-implemented).

The gateway validates before it spends an engine slot, so a bad request costs no
engine time and its 400 names the offending parameter the way OpenAI does
(``messages[0].content``).

Two guarantees, whatever the body:

- :func:`parse_json_body` bounds the body's nesting depth (checked on the text, without
  recursion, before the parser runs) and its array lengths, and rejects ``NaN``,
  ``Infinity`` and numbers that overflow to them (OpenAI answers 400 on them; Python's
  ``json`` accepts them).
- :func:`validate_request` raises nothing but :class:`InvalidRequestError`: every
  exception vLLM's request models can raise while validating (pydantic errors, vLLM's
  own ``VLLMValidationError``, which is not a ``ValueError`` and so escapes pydantic,
  ``TypeError`` from model validators fed odd types, ...) becomes a 400 whose message
  names the parameter when it is known and never carries exception class names,
  tracebacks or file paths (:mod:`serving.engine.request_errors`, which the engine
  uses too for what only it finds).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import re
from itertools import accumulate
from typing import Any

from pydantic import BaseModel, ValidationError

from serving.config import GatewayConfig
from serving.engine.protocol import Endpoint
from serving.engine.request_errors import describe
from serving.gateway.errors import InvalidRequestError

__all__ = ["invalid_request", "parse_json_body", "validate_request"]

log = logging.getLogger("oss_serving.api")

_DEFAULTS = GatewayConfig()


def _model_for(endpoint: Endpoint) -> type[BaseModel]:
    if endpoint is Endpoint.chat:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest  # type: ignore[no-any-return]
    if endpoint is Endpoint.completions:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return CompletionRequest  # type: ignore[no-any-return]
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return ResponsesRequest  # type: ignore[no-any-return]


def preload() -> None:
    """Import vLLM's protocol models now (several seconds: they pull in torch), so that a
    fresh gateway's first request of each kind does not pay for it on the event loop."""
    for endpoint in Endpoint:
        _model_for(endpoint)
    from vllm.entrypoints.openai.responses.protocol import ResponsesResponse  # noqa: F401
    from vllm.sampling_params import SamplingParams  # noqa: F401


# ---------------------------------------------------------------------------------------
# Parsing


class _NonFiniteNumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumber(name)


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')  # on text that holds only quotes and brackets: linear
# Depth as a running sum without a Python loop: openers count 2, closers 0, so the
# running sum minus the number of brackets seen is the depth after each bracket.
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _nesting_depth(raw: bytes, limit: int) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``raw`` (UTF-8), found
    without recursion.

    Escapes are dropped first (so ``\\"`` never ends a string), then everything but quotes
    and brackets (in UTF-8 those bytes never occur inside another character), then the
    strings: what is left are the structural brackets in order. For text that is not valid
    JSON the figure may be off, but it is never below the depth the parser reaches before
    it finds the error, so the parser itself never recurses deeper than ``limit``.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0  # cannot be deeper than the number of openers
    skeleton = _STRING.sub(b"", _ESCAPE.sub(b"", raw).translate(None, _NOT_STRUCTURE))
    quote = skeleton.find(b'"')
    if quote >= 0:  # an unterminated string: the parser stops there
        skeleton = skeleton[:quote]
    if not skeleton:
        return 0
    steps = skeleton.translate(_DEPTH_STEP)
    depth: int = max(map(operator.sub, accumulate(steps), range(1, len(steps) + 1)))
    return depth


# A surrogate can only enter a body through a \\u escape (UTF-8 cannot carry one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _lone_surrogate_error() -> InvalidRequestError:
    return InvalidRequestError(
        "We could not parse the JSON body of your request: a string in it has an unpaired "
        "surrogate escape (\\ud800-\\udfff), which is not valid Unicode.",
        code="invalid_json",
    )


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
"""Integers vLLM can carry: its engine core receives requests as msgpack, whose integers
are 64-bit; a larger one fails the request inside the engine (an unhelpful 502)."""


def _check_values(data: dict[str, Any], max_items: int, strings: bool) -> None:
    """Array lengths, finite numbers, 64-bit integers and (when ``strings``) strings that
    are valid Unicode, over the parsed body, without recursion."""
    for param, top in data.items():
        if strings and _lone_surrogate(param):
            raise _lone_surrogate_error()
        stack = [top]
        while stack:
            node = stack.pop()
            kind = type(node)
            if kind is list:
                if len(node) > max_items:
                    raise InvalidRequestError(
                        f"The request body has an array of {len(node)} items; "
                        f"at most {max_items} are allowed.",
                        param=param,
                        code="array_too_long",
                    )
                stack.extend(node)
            elif kind is dict:
                if strings and any(_lone_surrogate(key) for key in node):
                    raise _lone_surrogate_error()
                stack.extend(node.values())
            elif kind is float:
                if not math.isfinite(node):
                    raise InvalidRequestError(
                        "The request body has a number too large to represent; numbers must be finite.",
                        param=param,
                        code="invalid_json",
                    )
            elif kind is int:
                if not _INT_MIN <= node <= _INT_MAX:
                    raise InvalidRequestError(
                        f"Invalid value for '{param}': integers must be within the 64-bit range "
                        f"(-2**63 to 2**64 - 1).",
                        param=param,
                        code="invalid_value",
                    )
            elif strings and kind is str and _lone_surrogate(node):
                raise _lone_surrogate_error()


def parse_json_body(raw: bytes, config: GatewayConfig | None = None) -> dict[str, Any]:
    """The request body as a JSON object, within ``config``'s limits; 400 otherwise.

    Limits: ``config.max_json_depth`` (nesting of arrays and objects, the body being level
    1) and ``config.max_array_items`` (items of any one array). ``None``: the defaults of
    :class:`GatewayConfig`. Errors, all :class:`InvalidRequestError`:
    ``invalid_json`` (not UTF-8, not JSON, ``NaN`` or ``Infinity``, a non-finite or
    over-long number, an unpaired surrogate escape, not an object), ``nesting_too_deep``,
    ``array_too_long`` and ``invalid_value`` (an integer beyond 64 bits, which vLLM's
    engine core cannot receive). ``param`` is the top-level key the offending value is in,
    if any.
    """
    limits = config or _DEFAULTS
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request: it is not valid UTF-8.", code="invalid_json"
        ) from None
    depth = _nesting_depth(raw, limits.max_json_depth)
    if depth > limits.max_json_depth:
        raise InvalidRequestError(
            f"The request body nests arrays and objects {depth} levels deep; "
            f"at most {limits.max_json_depth} are allowed.",
            code="nesting_too_deep",
        )
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except _NonFiniteNumber as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc} is not a valid JSON value.",
            code="invalid_json",
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    except (ValueError, RecursionError):  # e.g. an integer of more than 4300 digits
        raise InvalidRequestError(
            "We could not parse the JSON body of your request: a number in it is too long.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    _check_values(data, limits.max_array_items, strings=_SURROGATE_ESCAPE.search(raw) is not None)
    return data


# ---------------------------------------------------------------------------------------
# Validation


def invalid_request(exc: BaseException, max_chars: int = 2000) -> InvalidRequestError:
    """A 400 for an exception raised while validating a request (see
    :func:`serving.engine.request_errors.describe` for the message and ``param``)."""
    if isinstance(exc, InvalidRequestError):
        return exc
    error = describe(exc, max_chars)
    return InvalidRequestError(error.message, param=error.param, code=error.code)


def _check_responses_answer(request: Any) -> None:
    """Values a Responses request may hold but vLLM's ``ResponsesResponse`` rejects.

    vLLM builds its answer from the request (``ResponsesResponse.from_request``), and some
    request fields accept ``null`` while the answer's do not (``background``,
    ``truncation``): such a request validates, runs, and then fails inside the engine.
    Build that answer here with neutral sampling values, so that the request is rejected
    before any engine work. Anything but a validation error (a vLLM version whose
    ``from_request`` differs) is left to the engine.
    """
    try:
        from vllm.entrypoints.openai.responses.protocol import ResponsesResponse
        from vllm.sampling_params import SamplingParams

        ResponsesResponse.from_request(
            request,
            SamplingParams(max_tokens=1),
            model_name=str(request.model),
            created_time=0,
            output=[],
            status="completed",
        )
    except ValidationError:
        raise
    except Exception:
        log.debug("ResponsesResponse check skipped", exc_info=True)


MAX_LENGTH_PENALTY = 50.0
"""Largest ``|length_penalty|`` of a beam search request. vLLM accepts any value but
scores beams by ``logprob / len ** length_penalty``, which overflows or divides by zero
past about ``1024 / log2(len)``: 50 keeps prompts of up to a million tokens safe, far
beyond the values anyone uses (around 1)."""


def _check_beam_search(request: Any) -> None:
    penalty = getattr(request, "length_penalty", None)
    if not getattr(request, "use_beam_search", False) or not isinstance(penalty, int | float):
        return
    if not -MAX_LENGTH_PENALTY <= penalty <= MAX_LENGTH_PENALTY:
        raise InvalidRequestError(
            f"Invalid value for 'length_penalty': {penalty:g} is out of range; with beam "
            f"search it must be between {-MAX_LENGTH_PENALTY:g} and {MAX_LENGTH_PENALTY:g}.",
            param="length_penalty",
            code="invalid_value",
        )


def validate_request(endpoint: Endpoint, body: dict[str, Any], max_message_chars: int) -> str:
    """Check ``body`` against vLLM's model for ``endpoint``; return the model name.

    Raises only :class:`InvalidRequestError` (400). ``body`` is not modified (vLLM's
    validators fill defaults into the dict they are given: they get a copy).
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model", code="missing_model")
    request_model = _model_for(endpoint)
    try:
        request = request_model.model_validate(dict(body))
        if endpoint is Endpoint.responses:
            _check_responses_answer(request)
        else:
            _check_beam_search(request)
    except Exception as exc:
        raise invalid_request(exc, max_message_chars) from None
    return model
