"""What a client is told when vLLM's request models reject its request.

vLLM's protocol models raise many kinds of exception while validating or preparing a
request: pydantic's ``ValidationError``, vLLM's own ``VLLMValidationError`` (not a
``ValueError``, so pydantic lets it through unwrapped), ``ValueError`` from model
validators, and ``TypeError``/``KeyError``/``AttributeError`` when a validator meets a
value of an unexpected type. :func:`describe` turns any of them into a message that names
the parameter when it is known and never carries exception class names, tracebacks,
file paths or pydantic's documentation links; :func:`is_client_error` says which are the
request's fault (the classes vLLM's own server answers with 4xx).

Both the gateway (``serving.gateway.validation``, before any engine work) and the engine
replica (``serving.engine.server``, for what only the engine finds) use it, so it lives
here, below both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

__all__ = ["RequestError", "clean_message", "describe", "is_client_error", "param_path"]


@dataclass(frozen=True)
class RequestError:
    """A rejected request, ready for OpenAI's error body (``type`` is
    ``invalid_request_error``)."""

    message: str
    param: str | None
    code: str
    """``invalid_value``, ``missing_required_parameter`` or ``not_found``."""
    status: int
    """400, or 404 for vLLM's not-found errors (an unknown ``previous_response_id``)."""


# pydantic-core's names for the steps of a validator chain or union branches: in an
# error's location they are not parameters (vLLM's exception handler drops the same).
_LOC_MARKERS = frozenset(
    [
        "function-wrap",
        "function-after",
        "function-before",
        "function-plain",
        "json-or-python",
        "lax-or-strict",
        "chain",
        "default",
        "nullable",
        "tagged-union",
        "union",
        "call",
        "arguments",
        "is-instance",
        "is-subclass",
        "callable",
        "str",
        "int",
        "float",
        "bool",
        "bytes",
        "bytearray",
        "list",
        "tuple",
        "dict",
        "set",
        "frozenset",
        "complex",
        "none",
        "nonetype",
        "literal",
        "enum",
        "json",
    ]
)


def param_path(loc: tuple[int | str, ...]) -> str | None:
    """OpenAI-style parameter path from a pydantic error location.

    Union tags (``function-after[...]``, ``str``, ``list[...]``) and the class names of
    union branches (``ChatCompletionUserMessageParam``) are dropped: they are not
    parameters a client sent.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part.lower() not in _LOC_MARKERS and not part[:1].isupper():
            out += f".{part}" if out else part
    return out or None


# What must never reach a client: paths, addresses, traceback lines, exception class
# names, pydantic's documentation links and its echo of the input.
_SCRUB = [
    (re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL), ""),
    (re.compile(r'\s*File "[^"]*", line \d+.*'), ""),
    (re.compile(r"\s*For further information visit \S+"), ""),
    (re.compile(r"\s*\[type=[^\]]*\]"), ""),
    (re.compile(r" at 0x[0-9a-fA-F]+"), ""),
    (re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-]+){2,}"), "<path>"),
    (re.compile(r",? ?or (?:an? )?instance of [\w.]+"), ""),
    (re.compile(r"\b(?:an? )?instance of [\w.]+"), "a value of the expected type"),
    (re.compile(r"\b(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Warning)\b:?\s*"), ""),
    (re.compile(r"\b(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception)\("), "("),
    (re.compile(r"\b(?:pydantic|pydantic_core|vllm)(?:\.\w+)+"), ""),
]

# str() of a pydantic ValidationError: "1 validation error for Author\nrole\n  Input should ..."
_PYDANTIC_TEXT = re.compile(
    r"\d+ validation errors? for [\w.]+\n(?P<loc>[^\n]*)\n[ \t]+(?P<msg>[^\n]*)(?:\n.*)?", re.DOTALL
)
# str() of vLLM's VLLMValidationError ends with "(parameter=..., value=...)".
_VLLM_TAIL = re.compile(r"\s*\((?:parameter|value)=.*\)\s*$", re.DOTALL)

_GENERIC = "The request has a parameter of the wrong type or shape; check it against the API reference."


def _scrub(text: str) -> str:
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return " ".join(text.split()).strip(" :,") or "The request has an invalid value."


def clean_message(text: str) -> str:
    """An error message from vLLM (its 4xx answers carry ``str(exception)``) made fit for a
    client: pydantic's multi-line text becomes ``Invalid value for 'loc': msg``, vLLM's
    ``(parameter=..., value=...)`` tail goes, and so do class names, paths and links."""
    found = _PYDANTIC_TEXT.search(text)
    if found:
        parts: list[int | str] = [int(p) if p.isdigit() else p for p in found["loc"].strip().split(".")]
        loc = param_path(tuple(parts))
        msg = found["msg"]
        text = text[: found.start()] + (f"Invalid value for '{loc}': {msg}" if loc else msg)
    return _scrub(_VLLM_TAIL.sub("", text))


def _pydantic_message(error: Any) -> tuple[str, str | None, str]:
    param = param_path(tuple(error.get("loc", ())))
    if error.get("type") == "missing" and param:
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    text = str(error.get("msg", ""))
    text = _scrub(text.removeprefix("Value error, ").removeprefix("Assertion failed, "))
    if param:
        return f"Invalid value for '{param}': {text}", param, "invalid_value"
    return text, None, "invalid_value"


def _vllm_errors() -> tuple[type[BaseException], type[BaseException]] | None:
    try:
        from vllm.exceptions import VLLMClientError, VLLMNotFoundError
    except ImportError:  # a gateway image without vLLM: none of its errors can occur
        return None
    return VLLMClientError, VLLMNotFoundError


def _is_template_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "TemplateError" for cls in type(exc).__mro__)  # jinja2's


def describe(exc: BaseException, max_chars: int = 2000) -> RequestError:
    """The client's view of an exception raised while validating or preparing a request.

    The message is the validator's own text (pydantic's message for the first error,
    vLLM's ``VLLMValidationError`` text without its ``(parameter=..., value=...)`` tail,
    a plain ``ValueError``'s text), scrubbed; exceptions whose text is Python's own
    (``TypeError``, ``KeyError``, ``AttributeError``, ``RecursionError``, ...) get a
    generic message. ``param`` is the parameter when pydantic's location or vLLM's error
    names it. The message is cut to ``max_chars``.
    """
    exc = _generate_error_cause(exc) or exc
    param: str | None = None
    code = "invalid_value"
    status = 400
    vllm = _vllm_errors()
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        message, param, code = _pydantic_message(errors[0]) if errors else (_GENERIC, None, code)
    elif vllm is not None and isinstance(exc, vllm[0]):
        parameter = getattr(exc, "parameter", None)
        param = parameter if isinstance(parameter, str) and parameter else None
        message = _scrub(str(exc.args[0]) if exc.args else "")
        if param and f"'{param}'" not in message and f"`{param}`" not in message:
            message = f"Invalid value for '{param}': {message}"
        if isinstance(exc, vllm[1]):
            status, code = 404, "not_found"
    elif type(exc) is ValueError or _is_template_error(exc):
        message = _scrub(str(exc))
    elif isinstance(exc, RecursionError):
        message = "The request is nested too deeply to be processed."
    elif isinstance(exc, ArithmeticError):
        message = "A parameter of the request has a value too extreme to compute with."
    else:
        message = _GENERIC
    return RequestError(message[:max_chars], param, code, status)


def _generate_error_cause(exc: BaseException) -> BaseException | None:
    """What vLLM's ``AsyncLLM.generate`` wrapped in its ``EngineGenerateError`` (e.g. the
    ``OverflowError`` of sending a request with an integer beyond 64 bits to the engine
    core), if ``exc`` is one."""
    if type(exc).__name__ == "EngineGenerateError" and exc.__cause__ is not None:
        return exc.__cause__
    return None


def is_client_error(exc: BaseException, *, before_output: bool = False) -> bool:
    """Whether ``exc``, raised while preparing or running a request, is the request's fault.

    The classes vLLM's own server answers with 4xx: its ``VLLMClientError``, pydantic's
    ``ValidationError`` and the plain ``ValueError``/``TypeError``/``OverflowError`` its
    code raises for bad values, and template errors of a request's chat template; also
    ``RecursionError`` (a value nested too deeply for a validator).

    ``before_output``: raised while vLLM turned a validated request into a prompt and
    started on it, before any output. A client error that vLLM's engine wrapped in its
    ``EngineGenerateError`` counts as what it wraps. There ``AttributeError``, ``KeyError`` and
    ``IndexError`` count too: vLLM's prompt rendering meets message shapes its request
    model accepts but it does not handle (gpt-oss's Harmony rendering calls ``.get`` on a
    message that validated as a Harmony ``Message``, iterates ``"tool_calls": null``, ...);
    so does ``ArithmeticError``: extreme parameter values that vLLM accepts break its
    arithmetic (beam search divides by ``len ** length_penalty``, zero for a
    ``length_penalty`` of ``-1e78``).
    """
    vllm = _vllm_errors()
    if before_output:
        if isinstance(exc, AttributeError | KeyError | IndexError | ArithmeticError):
            return True
        cause = _generate_error_cause(exc)
        if cause is not None:
            return is_client_error(cause)
    return (
        (vllm is not None and isinstance(exc, vllm[0]))
        or isinstance(exc, ValueError | TypeError | OverflowError | RecursionError)
        or _is_template_error(exc)
    )
