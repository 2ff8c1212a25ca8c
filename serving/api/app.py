"""The OpenAI-compatible HTTP API: thin routes over :class:`GatewayService`.

Each route reads and checks the body, asks the gateway, and writes JSON or SSE. No
policy lives here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving.api.errors import error_body, error_response, install_error_handlers, request_id_of
from serving.api.middleware import RequestIdMiddleware
from serving.api.protocol import parse_json_body, validate_request
from serving.config import GatewayConfig
from serving.engine.protocol import Endpoint
from serving.gateway.context import RequestContext
from serving.gateway.errors import GatewayError, PayloadTooLargeError
from serving.gateway.service import GatewayService
from serving.metrics import CONTENT_TYPE_LATEST, GatewayMetrics

__all__ = ["create_app"]

log = logging.getLogger("oss_serving.api")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


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
        rid = request_id_of(request) or "-"
        try:
            body = parse_json_body(await read_body(request, config.max_body_bytes))
            model = validate_request(endpoint, body, config.max_error_message_chars)
            ctx = RequestContext(
                request_id=rid,
                endpoint=endpoint,
                model=model,
                body=body,
                headers={k.lower(): v for k, v in request.headers.items()},
            )
            answer, stream = await service.run(ctx)
        except GatewayError as exc:
            return error_response(exc, rid, config.max_error_message_chars)
        if answer is not None:
            return JSONResponse(
                _with_request_id(answer.body, rid, answer.status),
                status_code=answer.status,
                headers=ctx.response_headers,
            )
        assert stream is not None
        return StreamingResponse(
            _sse(stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ctx.response_headers},
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serve(Endpoint.chat, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(Endpoint.completions, request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await serve(Endpoint.responses, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card(m) for m in service.model_ids()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> Response:
        try:
            return JSONResponse(service.model_card(model))
        except GatewayError as exc:
            return error_response(exc, request_id_of(request))

    @app.get("/health")
    @app.get("/health/ready")
    async def health() -> JSONResponse:
        report = service.health()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return JSONResponse(error_body("metrics are disabled", "invalid_request_error"), status_code=404)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _with_request_id(body: dict[str, Any], rid: str, status: int) -> dict[str, Any]:
    error = body.get("error")
    if status >= 400 and isinstance(error, dict):
        error.setdefault("param", None)
        error.setdefault("code", None)
        error["request_id"] = rid
    return body


async def _sse(stream: AsyncIterator[str]) -> AsyncIterator[bytes]:
    try:
        async for text in stream:
            yield text.encode()
    finally:
        # On client disconnect Starlette cancels this generator: close the relay at once
        # so that the engine request is cancelled now, not when the generator is collected.
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
