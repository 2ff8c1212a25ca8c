"""Error answers: every one goes through :func:`serving.wire.error_body`, logged once.

Messages are cut to the configured length; internal exception text never reaches a
client (a 500 says only that the error is internal, with the request id to look up).
Requests of the generation endpoints are logged by their flight when it closes; the
others (model lookups, unknown routes, unexpected errors) are logged here.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from serving.gateway.errors import GatewayError, InternalError
from serving.wire import error_body

__all__ = ["error_response", "install_error_handlers", "request_id_of"]

log = logging.getLogger("oss_serving.api")


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "-"


def error_response(exc: GatewayError, request_id: str, max_chars: int = 2000) -> JSONResponse:
    """The OpenAI error answer of ``exc`` (status, body, headers such as Retry-After)."""
    return JSONResponse(exc.body(request_id, max_chars), status_code=exc.status, headers=exc.headers)


def install_error_handlers(app: FastAPI, max_chars: int) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        rid = request_id_of(request)
        log.info("request_id=%s %s status=%d code=%s", rid, request.url.path, exc.status, exc.code)
        return error_response(exc, rid, max_chars)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        rid = request_id_of(request)
        status = exc.status_code
        log.info("request_id=%s %s %s status=%d", rid, request.method, request.url.path, status)
        if status == 404:
            message, code = f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
        elif status == 405:
            message, code = (
                f"Method {request.method} is not allowed on {request.url.path}.",
                "method_not_allowed",
            )
        else:
            message, code = "The request could not be served.", None
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(
            error_body(message, kind, code=code, request_id=rid),
            status_code=status,
            headers=getattr(exc, "headers", None),
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request)
        log.exception("request_id=%s %s: internal error", rid, request.url.path)
        return error_response(InternalError(), rid, max_chars)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
