"""Where the Files API keeps file contents: one interface, a backend per deployment.

Batch input files, and the output and error files the gateway writes, live in storage
that every gateway replica shares: a directory for one machine (``LocalBlobStore``), or
an S3-compatible object store, the enterprise's own (``S3BlobStore`` in
:mod:`serving.gateway.s3`). File metadata (names, sizes, owners) lives in Redis
(:mod:`serving.gateway.files`); a blob store only keeps bytes under a key.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["BlobNotFoundError", "BlobStore", "BlobStoreError"]


class BlobStoreError(Exception):
    """The store failed (unreachable, refused, timed out): the caller may retry."""


class BlobNotFoundError(BlobStoreError):
    """No blob under that key."""


class BlobStore(Protocol):
    """Bytes under keys (``/``-separated, no leading slash). Every method is async and
    never blocks the event loop; errors are :class:`BlobStoreError`."""

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there, atomically (a reader
        sees the old bytes or the new ones, never a part)."""
        ...

    async def get(self, key: str) -> bytes:
        """The bytes under ``key`` (:class:`BlobNotFoundError` when there are none)."""
        ...

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` (included) to ``end`` (excluded) of the blob under ``key``."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; nothing happens when it is not there."""
        ...

    async def aclose(self) -> None:
        """Release connections (the service's shutdown calls it)."""
        ...
