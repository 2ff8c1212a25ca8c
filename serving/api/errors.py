"""One mapping from exceptions to OpenAI's error body, registered once on the app.

Messages are cut to the configured length; internal exception text never reaches a
client (a 500 says only that the error is internal, with the request id to look up).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from serving.gateway.errors import GatewayError

__all__ = ["error_body", "error_response", "install_error_handlers"]

log = logging.getLogger("oss_serving.api")


def error_body(
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(exc: GatewayError, request_id: str | None, max_chars: int = 2000) -> JSONResponse:
    body = error_body(
        exc.message[:max_chars], exc.type, param=exc.param, code=exc.code, request_id=request_id
    )
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def install_error_handlers(app: FastAPI, max_chars: int) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        rid = request_id_of(request)
        log.info("request %s failed: %s %s", rid, exc.status, exc.message[:200])
        return error_response(exc, rid, max_chars)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request)
        log.exception("request %s: internal error", rid)
        body = error_body(
            "The server had an internal error while processing your request.", "server_error", request_id=rid
        )
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(Exception, on_unexpected)
