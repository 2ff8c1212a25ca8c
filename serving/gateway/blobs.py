"""Where the Files API keeps file contents: one interface, a backend per deployment.

Batch input files, and the output and error files the gateway writes, live in storage
that every gateway replica shares (``files.backend``): a directory (``LocalBlobStore``),
on one machine or on a volume every gateway pod mounts, or an S3-compatible object
store, AWS S3 or the enterprise's own (``S3BlobStore`` in
:mod:`serving.gateway.s3_blobs`). ``build.py`` picks one. File metadata (names, sizes,
owners) lives in Redis (:mod:`serving.gateway.files`); a blob store only keeps bytes
under a key.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

__all__ = ["BlobNotFoundError", "BlobStore", "BlobStoreError", "LocalBlobStore", "check_key"]


class BlobStoreError(Exception):
    """The store failed (unreachable, refused, timed out): the caller may retry."""


class BlobNotFoundError(BlobStoreError):
    """No blob under that key."""


class BlobStore(Protocol):
    """Bytes under keys (``/``-separated, no leading slash, see :func:`check_key`). Every
    method is async and never blocks the event loop; errors are :class:`BlobStoreError`."""

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


def check_key(key: str) -> list[str]:
    """The segments of a valid key: not empty, no empty, ``.`` or ``..`` segment (so no
    leading, trailing or doubled ``/``), no backslash or NUL. :class:`BlobStoreError`
    otherwise. Every backend checks keys the same way, so a key is valid everywhere."""
    parts = key.split("/")
    if not key or "\\" in key or "\x00" in key or any(part in ("", ".", "..") for part in parts):
        raise BlobStoreError(f"invalid blob key {key[:200]!r}")
    return parts


class LocalBlobStore:
    """Blobs as files under ``root``: the backend for one machine (every gateway replica on
    it shares the directory).

    A put writes a temporary file next to its target and renames it over the target, so a
    reader sees the old bytes or the new ones, never a part (a crash leaves a stray
    temporary file at worst, never a torn blob). File IO runs in threads
    (:func:`asyncio.to_thread`), never on the event loop. Keys are checked: no empty,
    ``.`` or ``..`` segment, no absolute path, no backslash or NUL, and the resolved path
    must stay under ``root`` (a symlink out of it is refused too).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str) -> Path:
        """The file of ``key``; :class:`BlobStoreError` when the key would leave the root."""
        parts = check_key(key)
        if parts[-1].startswith(".tmp-"):
            raise BlobStoreError(f"invalid blob key {key[:200]!r}")
        path = self.root.joinpath(*parts)
        resolved = path.resolve()
        if resolved != path or not resolved.is_relative_to(self.root):
            raise BlobStoreError(f"blob key {key[:200]!r} leaves the store's directory")
        return path

    async def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        await _in_thread(_write_atomically, path, data)

    async def get(self, key: str) -> bytes:
        path = self.path(key)
        data: bytes = await _in_thread(path.read_bytes, key=key)
        return data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if start < 0 or end < start:
            raise BlobStoreError(f"invalid range {start}-{end}")
        path = self.path(key)
        data: bytes = await _in_thread(_read_range, path, start, end, key=key)
        return data

    async def delete(self, key: str) -> None:
        path = self.path(key)
        await _in_thread(path.unlink, True)

    async def aclose(self) -> None:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


async def _in_thread(func: Any, *args: Any, key: str | None = None) -> Any:
    """``func(*args)`` in a thread, its OS errors as :class:`BlobStoreError`."""
    try:
        return await asyncio.to_thread(func, *args)
    except FileNotFoundError:
        raise BlobNotFoundError(f"no blob under {key!r}") from None
    except OSError as exc:
        raise BlobStoreError(f"blob store: {type(exc).__name__}: {exc.strerror or exc}") from exc
