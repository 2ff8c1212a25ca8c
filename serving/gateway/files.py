"""The Files API: uploaded batch input files and the output and error files of batches.

A file is two things: its metadata (OpenAI's ``file`` object: id, name, size, purpose,
creation time) in Redis, per tenant, and its bytes in the shared :class:`BlobStore`
(``files.backend``: a directory every gateway replica shares, ``files.dir``, or an
S3-compatible object store, ``files.s3``). Every gateway replica sees every file. A
tenant sees only its own: another tenant's id is a 404, as if it did not exist (the
metadata keys carry the tenant id).

Keys (``files.key_prefix``): ``<prefix>:<tenant>:<id>`` holds one file's object (JSON);
``<prefix>:<tenant>`` is the tenant's index (a sorted set of ids by creation time, in
milliseconds, for listing). Blobs are stored under ``<tenant>/<id>``.

Uploads accept ``purpose: batch`` only; the gateway itself writes ``batch_output`` files
(:meth:`Files.write_output`). Writes go blob first, then metadata: a file is listed only
once its bytes are stored. Deletes go metadata first, then the blob.

Redis or the blob store failing: 503 ``files_unavailable`` (retry), never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal, Protocol

from redis.exceptions import RedisError

from serving.config import FilesConfig
from serving.gateway.blobs import BlobNotFoundError, BlobStore, BlobStoreError
from serving.gateway.errors import GatewayError, InvalidRequestError
from serving.wire import dumps

__all__ = [
    "UPLOAD_PURPOSES",
    "FileNotFound",
    "FileTooLargeError",
    "Files",
    "FilesPort",
    "NotEnabledError",
    "StorageUnavailableError",
    "blob_key",
]

log = logging.getLogger("oss_serving.files")

REDIS_DOWN = (RedisError, OSError, asyncio.TimeoutError)

UPLOAD_PURPOSES = ("batch",)
"""Purposes a client may upload (OpenAI has more; only batch files have a use here)."""

Order = Literal["asc", "desc"]


class FileNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, file_id: str, *, param: str | None = None) -> None:
        super().__init__(f"No such File object: {file_id[:200]}", param=param, code="file_not_found")


class FileTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"File is too large: the maximum size is {limit} bytes (files.max_bytes).",
            param="file",
            code="file_too_large",
        )


class StorageUnavailableError(GatewayError):
    """503: Redis or the blob store did not answer (retry): ``files_unavailable``, or
    ``batches_unavailable`` for the batch store."""

    status = 503
    type = "server_error"

    def __init__(self, what: str = "File storage", code: str = "files_unavailable") -> None:
        super().__init__(f"{what} is unavailable; retry shortly.", code=code, headers={"Retry-After": "1"})


class NotEnabledError(InvalidRequestError):
    """The Files and Batch APIs are off (``batch.enabled``, or no Redis)."""

    def __init__(self) -> None:
        super().__init__(
            "The Files and Batch APIs are not enabled on this deployment (they need Redis and "
            "batch.enabled).",
            code="not_enabled",
        )


def blob_key(tenant: str, file_id: str) -> str:
    """Where a file's bytes are stored."""
    return f"{tenant}/{file_id}"


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class FilesPort(Protocol):
    """The Files API as the routes and batches use it (:class:`Files`, or :class:`FilesOff`)."""

    @property
    def max_bytes(self) -> int: ...

    async def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]: ...

    async def list(
        self, tenant: str, *, after: str | None, limit: int, order: Order, purpose: str | None
    ) -> dict[str, Any]: ...

    async def retrieve(self, tenant: str, file_id: str) -> dict[str, Any]: ...

    async def content(self, tenant: str, file_id: str) -> bytes: ...

    async def delete(self, tenant: str, file_id: str) -> dict[str, Any]: ...


class FilesOff:
    """The Files API turned off: every call is a 400 ``not_enabled``."""

    def __init__(self, config: FilesConfig) -> None:
        self.max_bytes = config.max_bytes

    async def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        raise NotEnabledError()

    async def list(
        self, tenant: str, *, after: str | None, limit: int, order: Order, purpose: str | None
    ) -> dict[str, Any]:
        raise NotEnabledError()

    async def retrieve(self, tenant: str, file_id: str) -> dict[str, Any]:
        raise NotEnabledError()

    async def content(self, tenant: str, file_id: str) -> bytes:
        raise NotEnabledError()

    async def delete(self, tenant: str, file_id: str) -> dict[str, Any]:
        raise NotEnabledError()


class Files:
    """File metadata in Redis, contents in a :class:`BlobStore` (see the module docstring)."""

    def __init__(self, redis: Any, blobs: BlobStore, config: FilesConfig) -> None:
        self._redis = redis
        self.blobs = blobs
        self._config = config
        self.max_bytes = config.max_bytes

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        """Release the blob store's connections (the service's shutdown)."""
        try:
            await self.blobs.aclose()
        except BlobStoreError as exc:
            log.warning("closing the blob store failed: %s", exc)

    def _key(self, tenant: str, file_id: str) -> str:
        return f"{self._config.key_prefix}:{tenant}:{file_id}"

    def _index(self, tenant: str) -> str:
        return f"{self._config.key_prefix}:{tenant}"

    # ----------------------------------------------------------------- the API
    async def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Store an upload (``purpose`` checked by the caller against :data:`UPLOAD_PURPOSES`)."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequestError(
                f"Invalid purpose {purpose[:64]!r}: this deployment accepts files for "
                f"{', '.join(repr(p) for p in UPLOAD_PURPOSES)} only.",
                param="purpose",
                code="invalid_value",
            )
        if len(data) > self.max_bytes:
            raise FileTooLargeError(self.max_bytes)
        return await self._store(tenant, new_file_id(), filename or "upload.jsonl", purpose, data)

    async def write_output(self, tenant: str, file_id: str, filename: str, data: bytes) -> dict[str, Any]:
        """A file the gateway writes (a batch's output or error file, purpose
        ``batch_output``): the same id again replaces it (finalization may be repeated)."""
        return await self._store(tenant, file_id, filename, "batch_output", data)

    async def list(
        self, tenant: str, *, after: str | None, limit: int, order: Order, purpose: str | None
    ) -> dict[str, Any]:
        """OpenAI's list object: the tenant's files by creation time, ``after`` a cursor."""
        index = self._index(tenant)
        try:
            if order == "desc":
                ids = await self._redis.zrevrange(index, 0, -1)
            else:
                ids = await self._redis.zrange(index, 0, -1)
            names = [_s(i) for i in ids]
            if after is not None:
                names = names[names.index(after) + 1 :] if after in names else []
            page: list[dict[str, Any]] = []
            more = False
            for start in range(0, len(names), 200):
                chunk = names[start : start + 200]
                raws = await self._redis.mget([self._key(tenant, n) for n in chunk])
                for raw in raws:
                    obj = _decode(raw)
                    if obj is None or (purpose is not None and obj.get("purpose") != purpose):
                        continue
                    if len(page) == limit:
                        more = True
                        break
                    page.append(obj)
                if more:
                    break
        except REDIS_DOWN:
            raise StorageUnavailableError() from None
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": more,
        }

    async def retrieve(self, tenant: str, file_id: str) -> dict[str, Any]:
        try:
            obj = _decode(await self._redis.get(self._key(tenant, file_id)))
        except REDIS_DOWN:
            raise StorageUnavailableError() from None
        if obj is None:
            raise FileNotFound(file_id)
        return obj

    async def content(self, tenant: str, file_id: str) -> bytes:
        await self.retrieve(tenant, file_id)
        try:
            return await self.blobs.get(blob_key(tenant, file_id))
        except BlobNotFoundError:
            raise FileNotFound(file_id) from None
        except BlobStoreError as exc:
            log.warning("file %s of tenant %s: the blob store failed: %s", file_id, tenant, exc)
            raise StorageUnavailableError() from None

    async def delete(self, tenant: str, file_id: str) -> dict[str, Any]:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(tenant, file_id))
                pipe.zrem(self._index(tenant), file_id)
                deleted, _ = await pipe.execute()
        except REDIS_DOWN:
            raise StorageUnavailableError() from None
        if not deleted:
            raise FileNotFound(file_id)
        try:
            await self.blobs.delete(blob_key(tenant, file_id))
        except BlobStoreError as exc:  # the metadata is gone: the file is deleted for everyone
            log.warning("file %s of tenant %s: its blob was not deleted: %s", file_id, tenant, exc)
        return {"id": file_id, "object": "file", "deleted": True}

    # ----------------------------------------------------------------- helpers
    async def _store(
        self, tenant: str, file_id: str, filename: str, purpose: str, data: bytes
    ) -> dict[str, Any]:
        now = time.time()
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(now),
            "filename": filename[:255],
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        try:
            await self.blobs.put(blob_key(tenant, file_id), data)
        except BlobStoreError as exc:
            log.warning("file %s of tenant %s not stored: the blob store failed: %s", file_id, tenant, exc)
            raise StorageUnavailableError() from None
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key(tenant, file_id), dumps(obj))
                pipe.zadd(self._index(tenant), {file_id: int(now * 1000)})
                await pipe.execute()
        except REDIS_DOWN:
            try:
                await self.blobs.delete(blob_key(tenant, file_id))
            except BlobStoreError:
                log.warning("file %s of tenant %s: an orphan blob stays behind", file_id, tenant)
            raise StorageUnavailableError() from None
        return obj


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
