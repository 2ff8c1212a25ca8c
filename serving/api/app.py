"""The OpenAI-compatible HTTP API: thin routes over :class:`GatewayService`.

Each generation route opens the request's flight, authenticates (401 before the body is
read), reads, parses and checks the body, hands it to the gateway, and writes JSON or
SSE. No policy lives here. Whatever happens, the flight is closed exactly once: by the
gateway for JSON answers and errors, by :class:`SSEResponse` for streams, even when the
client leaves before the stream starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.api.batch_routes import add_batch_routes
from serving.api.bodies import read_body
from serving.api.errors import error_response, install_error_handlers, request_id_of
from serving.api.middleware import RequestIdMiddleware
from serving.config import GatewayConfig
from serving.gateway.context import RequestContext
from serving.gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    UnauthorizedError,
)
from serving.gateway.service import GatewayService, ResponseStream
from serving.gateway.tenants import Tenant
from serving.gateway.validation import parse_json_body, validate_request
from serving.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from serving.wire import Endpoint

__all__ = ["SSEResponse", "create_app", "read_body"]

log = logging.getLogger("oss_serving.api")


class SSEResponse(StreamingResponse):
    """A streamed answer whose :class:`ResponseStream` is closed however the response ends:
    sent to the end, cut by a disconnect, or never started (cancelled before its first
    byte). Closing it closes the request's flight: lease, gauges, engine request."""

    def __init__(self, stream: ResponseStream, headers: dict[str, str]) -> None:
        super().__init__(
            _encoded(stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.stream.aclose())


async def _encoded(chunks: AsyncIterator[str]) -> AsyncIterator[bytes]:
    async for text in chunks:
        yield text.encode()


def create_app(
    service: GatewayService,
    config: GatewayConfig,
    metrics: GatewayMetrics | None,
    *,
    echo_request_id: bool = True,
) -> FastAPI:
    """Build the FastAPI app of one gateway replica.

    ``echo_request_id`` is off behind Ray Serve's proxy, which echoes X-Request-Id itself.
    """
    app = FastAPI(title="oss-serving", version="0.1.0", docs_url=None, redoc_url=None)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)
    install_error_handlers(app, config.max_error_message_chars)

    async def serve(endpoint: Endpoint, request: Request) -> Response:
        rid = request_id_of(request)
        flight = service.open(rid, endpoint)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            tenant = service.authenticate(headers)
            flight.tenant = tenant
            body = parse_json_body(await read_body(request, config.max_body_bytes), config)
            model = validate_request(endpoint, body, config.max_error_message_chars)
            ctx = RequestContext(
                request_id=rid, endpoint=endpoint, model=model, body=body, headers=headers, tenant=tenant
            )
            answer = await service.run(ctx, flight)
        except GatewayError as exc:
            await flight.close(exc.status, detail=exc.message)
            return error_response(exc, rid, config.max_error_message_chars)
        except asyncio.CancelledError:
            await flight.close(499)
            raise
        except Exception:
            log.exception("request_id=%s: internal error", rid)
            await flight.close(500, detail="internal error")
            return error_response(InternalError(), rid, config.max_error_message_chars)
        except BaseException:
            await flight.close(499)
            raise
        if answer.stream is not None:
            return SSEResponse(answer.stream, ctx.response_headers)
        assert answer.json is not None
        return JSONResponse(answer.json.body, status_code=answer.json.status, headers=ctx.response_headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serve(Endpoint.chat, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(Endpoint.completions, request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await serve(Endpoint.responses, request)

    def caller(request: Request) -> Tenant:
        return service.authenticate({k.lower(): v for k, v in request.headers.items()})

    # Stored responses (serving/gateway/responses.py), background ones (background.py):
    # each tenant sees only its own.
    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str, request: Request) -> Response:
        tenant = caller(request)
        query = request.query_params
        if query.get("stream", "false").lower() in ("false", "0", ""):
            stored = await service.conversations.retrieve(tenant.id, response_id)
            return JSONResponse(stored, headers=service.identity_headers())
        raw_after = query.get("starting_after", "-1")
        try:
            after = int(raw_after)
        except ValueError:
            after = -2
        if after < -1:
            raise InvalidRequestError(
                "'starting_after' must be an event's sequence_number (an integer, 0 or more).",
                param="starting_after",
                code="invalid_value",
            )
        events = await service.background.events(tenant.id, response_id, after)
        return StreamingResponse(
            _encoded(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **service.identity_headers()},
        )

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
        return await service.background.delete(caller(request).id, response_id)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str, request: Request) -> JSONResponse:
        cancelled = await service.background.cancel(caller(request).id, response_id)
        return JSONResponse(cancelled, headers=service.identity_headers())

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, request: Request) -> dict[str, Any]:
        tenant = caller(request)
        query = request.query_params
        raw_limit = query.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            raise InvalidRequestError(
                "'limit' must be an integer from 1 to 100.", param="limit", code="invalid_value"
            )
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
        return await service.conversations.input_items(
            tenant.id, response_id, limit=int(raw_limit), order=order, after=query.get("after")
        )

    # Files and batches (serving/gateway/files.py, batches.py): each tenant sees only its own.
    add_batch_routes(app, service, config)

    def operator(request: Request) -> bool:
        return service.open_doors or service.is_operator({k.lower(): v for k, v in request.headers.items()})

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        tenant = caller(request)  # 401 without a key, as OpenAI; only the tenant's models
        return {"object": "list", "data": [service.model_card(m) for m in service.models_for(tenant)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> Response:
        if model not in service.models_for(caller(request)):
            raise ModelNotFoundError(model)
        return JSONResponse(service.model_card(model))

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Everything (engines, Redis, admission) for operators; live/ready/status for the rest."""
        report = service.health_report()
        code = 200 if report["ready"] else 503
        if not operator(request):
            report = {k: report[k] for k in ("live", "ready", "status")}
        return JSONResponse(report, status_code=code)

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        report = service.health_report()
        return JSONResponse(
            {"ready": report["ready"], "status": report["status"]},
            status_code=200 if report["ready"] else 503,
        )

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if metrics is None:
            raise HTTPException(404)  # metrics are off: the route does not exist
        if not operator(request):
            raise UnauthorizedError("Metrics need an operator key (auth.admin_key_sha256).")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
