"""Errors the gateway raises; each becomes OpenAI's error body through :func:`serving.wire.error_body`.

::

    GatewayError (status, type, message, param, code, headers)
    ├── InvalidRequestError      400  invalid_request_error   bad JSON or parameters
    ├── ModelNotFoundError       404  invalid_request_error   model not configured
    ├── PayloadTooLargeError     413  invalid_request_error   body over the configured size
    ├── UnauthorizedError        401  invalid_request_error   missing, unknown or revoked API key
    ├── ForbiddenError           403  permission_error        model not allowed for the tenant
    ├── RateLimitError           429  requests | tokens       tenant limit reached (Retry-After, headers)
    ├── OverloadedError          503  server_error            queue cannot start it in time (Retry-After)
    ├── EngineNotReadyError      503  server_error            no ready engine replica (Retry-After)
    ├── GatewayTimeoutError      504  server_error            the request ran past its time limit
    ├── EngineFailedError        502  server_error            the engine failed without an answer
    └── InternalError            500  server_error            a bug: details are in the log only

Messages are written for clients: never an exception's text, which goes to the log.
"""

from __future__ import annotations

from typing import Any, Literal

from serving.wire import error_body

__all__ = [
    "EngineFailedError",
    "EngineNotReadyError",
    "ForbiddenError",
    "GatewayError",
    "GatewayTimeoutError",
    "InternalError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimit",
    "RateLimitError",
    "UnauthorizedError",
]


class GatewayError(Exception):
    """Base: an error with everything needed for an OpenAI-shaped answer."""

    status: int = 500
    type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def reason(self) -> str | None:
        """What happened, as a fixed word (a metric label): the ``code`` unless a subclass
        says more."""
        return self.code

    def body(self, request_id: str | None, max_chars: int = 2000) -> dict[str, Any]:
        """This error as the OpenAI error body."""
        return error_body(
            self.message[:max_chars], self.type, param=self.param, code=self.code, request_id=request_id
        )


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"


class ModelNotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Request body is larger than the configured limit of {limit} bytes.",
            code="request_too_large",
        )


class EngineNotReadyError(GatewayError):
    status = 503
    type = "server_error"

    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(
            f"The model '{model}' is not ready yet (its engines are starting or unhealthy); "
            f"retry in {retry_after_s} s.",
            code="model_not_ready",
            headers={"Retry-After": str(retry_after_s)},
        )


class GatewayTimeoutError(GatewayError):
    status = 504
    type = "server_error"


class EngineFailedError(GatewayError):
    status = 502
    type = "server_error"

    def __init__(self, message: str = "The engine failed while processing your request.") -> None:
        super().__init__(message, code="engine_error")


class InternalError(GatewayError):
    """500: an unexpected failure in the gateway itself (the log has the traceback)."""

    status = 500
    type = "server_error"

    def __init__(self) -> None:
        super().__init__(
            "The server had an internal error while processing your request.", code="internal_error"
        )


class UnauthorizedError(GatewayError):
    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(GatewayError):
    status = 403
    type = "permission_error"


RateLimit = Literal["requests", "tokens", "concurrency"]
"""Which tenant limit a 429 is for: requests or tokens per minute, or requests at once."""


class RateLimitError(GatewayError):
    """429: a tenant limit (requests, tokens or concurrency) is exhausted.

    As OpenAI: ``code`` is ``rate_limit_exceeded`` and ``type`` the limited resource,
    ``requests`` or ``tokens``. OpenAI has no concurrency limit; ours limits requests (at
    once rather than per minute), so its type is ``requests`` as well. :attr:`reason`
    still tells the three apart (``requests_limit_exceeded``, ``tokens_limit_exceeded``,
    ``concurrency_limit_exceeded``), for the rejection metric and the log.
    """

    status = 429
    type = "requests"

    def __init__(self, message: str, *, limit: RateLimit, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code="rate_limit_exceeded", headers=headers)
        self.limit: RateLimit = limit
        self.type = "tokens" if limit == "tokens" else "requests"

    @property
    def reason(self) -> str:
        return f"{self.limit}_limit_exceeded"


class OverloadedError(GatewayError):
    """503: the queue cannot start the request in time (deadline, wait limit)."""

    status = 503
    type = "server_error"
