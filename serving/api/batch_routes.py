"""The Files and Batch API routes: thin, over ``service.files`` and ``service.batches``.

Each route authenticates (401 before the body is read), parses what HTTP carries (the
multipart upload, bounded by ``files.max_bytes``; the JSON body; the query) and calls
the service; the policy is in :mod:`serving.gateway.files` and
:mod:`serving.gateway.batches`.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Message

from serving.api.bodies import read_body
from serving.config import GatewayConfig
from serving.gateway.errors import InvalidRequestError
from serving.gateway.files import FileTooLargeError
from serving.gateway.service import GatewayService
from serving.gateway.tenants import Tenant
from serving.gateway.validation import parse_json_body

__all__ = ["add_batch_routes", "read_upload"]

MULTIPART_OVERHEAD = 64 * 1024
"""Room for the multipart framing and the small fields beside the file itself."""


def _missing(param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


async def read_upload(request: Request, max_bytes: int) -> tuple[str, str, bytes]:
    """``(filename, purpose, content)`` of a ``multipart/form-data`` upload; 413 as soon as
    the body is known to exceed ``max_bytes`` (plus the framing), 400 when a part is missing."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidRequestError(
            "Uploads must be sent as multipart/form-data with the fields 'file' and 'purpose'.",
            code="invalid_content_type",
        )
    limit = max_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FileTooLargeError(max_bytes)
    received = 0

    async def bounded() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise FileTooLargeError(max_bytes)
        return message

    bounded_request = Request(request.scope, bounded)
    try:
        form = await bounded_request.form(max_files=1, max_fields=16)
    except ClientDisconnect:
        raise
    except FileTooLargeError:
        raise
    except Exception as exc:  # the framing does not parse (starlette's MultiPartException)
        raise InvalidRequestError(
            f"The multipart body could not be parsed: {str(exc)[:200]}", code="invalid_multipart"
        ) from None
    try:
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(purpose, str) or not purpose:
            raise _missing("purpose")
        if not isinstance(upload, UploadFile):
            raise _missing("file")
        content = await upload.read(max_bytes + 1)
        if len(content) > max_bytes:
            raise FileTooLargeError(max_bytes)
        return upload.filename or "upload.jsonl", purpose, content
    finally:
        await form.close()


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise InvalidRequestError(
            f"'limit' must be an integer from 1 to {most}.", param="limit", code="invalid_value"
        )
    return int(raw)


def add_batch_routes(app: FastAPI, service: GatewayService, config: GatewayConfig) -> None:
    """``/v1/files`` and ``/v1/batches`` on ``app`` (answers 400 ``not_enabled`` when off)."""

    def caller(request: Request) -> Tenant:
        return service.authenticate({k.lower(): v for k, v in request.headers.items()})

    @app.post("/v1/files")
    async def upload_file(request: Request) -> dict[str, Any]:
        tenant = caller(request)
        filename, purpose, content = await read_upload(request, service.files.max_bytes)
        return await service.files.create(tenant.id, filename, purpose, content)

    @app.get("/v1/files")
    async def list_files(request: Request) -> dict[str, Any]:
        tenant = caller(request)
        query = request.query_params
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
        return await service.files.list(
            tenant.id,
            after=query.get("after"),
            limit=_limit(request, 10_000, 10_000),
            order=cast(Literal["asc", "desc"], order),
            purpose=query.get("purpose"),
        )

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
        return await service.files.retrieve(caller(request).id, file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Response:
        content = await service.files.content(caller(request).id, file_id)
        return Response(content, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
        return await service.files.delete(caller(request).id, file_id)

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict[str, Any]:
        tenant = caller(request)
        body = parse_json_body(await read_body(request, config.max_body_bytes), config)
        return await service.batches.create(tenant, body)

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> dict[str, Any]:
        tenant = caller(request)
        after = request.query_params.get("after")
        return await service.batches.list(tenant.id, after=after, limit=_limit(request, 20, 100))

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return await service.batches.retrieve(caller(request).id, batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return await service.batches.cancel(caller(request).id, batch_id)
