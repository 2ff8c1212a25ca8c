"""ASGI plumbing: request ids.

Order (Starlette runs middleware last-added first): the request-id middleware is the
only one and wraps every route, so every response, errors included, carries
``X-Request-Id``.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.gateway.errors import InternalError
from serving.wire import REQUEST_ID_HEADER

__all__ = ["REQUEST_ID_HEADER", "RequestIdLogFilter", "RequestIdMiddleware", "current_request_id"]

_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces

log = logging.getLogger("oss_serving.api")

current_request_id: ContextVar[str | None] = ContextVar("oss_serving_request_id", default=None)


def accept_or_create(value: str | None) -> str:
    """The client's id if it is short and safe to log, else a new one."""
    if value and _SAFE_ID.match(value):
        return value
    return f"req-{uuid.uuid4().hex}"


class RequestIdMiddleware:
    """Takes ``X-Request-Id`` from the request or makes one; echoes it on the response."""

    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app = app
        # Behind Ray Serve's HTTP proxy, the proxy already takes or makes X-Request-Id,
        # hands it to us in the request headers, and echoes it: echoing it again would
        # send the header twice.
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for key, value in scope.get("headers", []):
            if key.lower() == REQUEST_ID_HEADER.encode():
                incoming = value.decode("latin-1")
                break
        request_id = accept_or_create(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.echo:
                    headers = MutableHeaders(scope=message)
                    headers[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug below: answer the OpenAI 500 (with the id) here, where the header is set.
            log.exception("request_id=%s: internal error", request_id)
            if started:
                raise
            body = InternalError().body(request_id)
            await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to log records (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True
