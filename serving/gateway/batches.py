"""The Batch API: a file of requests, run by every gateway replica at the lowest priority.

A batch is created from an uploaded file (``purpose: batch``, :mod:`serving.gateway.files`)
of JSONL lines ``{"custom_id", "method": "POST", "url", "body"}``. Creating it reads and
checks every line; each good line becomes one entry of a Redis stream shared by every
replica (``{batch, index, offset, length}``: where the line lies in the stored input
file, read back with ``get_range`` when it runs). Every replica runs a
:class:`BatchWorker`, which claims lines from the stream's consumer group, runs each
through the whole pipeline (:meth:`GatewayService.submit`: validation, the tenant's
limits, admission at priority ``batch``, so interactive and standard traffic always go
first and batches use what is left), and writes its answer.

Exactly once, whatever dies:

- A worker keeps its claims alive while their lines run (``XCLAIM ... JUSTID``, every
  third of ``batch.claim_idle_s``); a line whose worker stopped renewing it is taken over
  by another replica (``XAUTOCLAIM``). A line can therefore run twice, never be answered
  twice: its result is written only when its ``custom_id`` has none yet, in the same
  script that acknowledges and deletes its stream entry and decrements the batch's
  ``remaining`` count (only the call that deleted the entry decrements it).
- The replica that sees ``remaining`` reach 0 finalizes the batch: the output and error
  files are written (deterministic ids: a repeated finalization replaces them) and the
  batch becomes ``completed`` (``cancelled``, ``expired``), under a lock with a TTL.
  A sweeper in every replica finishes batches whose finalizer died, and batches past
  their window whose lines were lost.
- Redis restarted with its append-only file: the stream, the group, its pending entries
  and the results come back; a lost acknowledgement means one more run, which the
  write-once result makes harmless. Redis down for a while: workers back off and resume.

The answers, as OpenAI writes them: a 2xx answer goes to the output file as
``{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}``; any other status goes to the error file the same way (the body is the
error body). A line that cannot run at all (not JSON, no ``custom_id``, another method or
URL) goes to the error file with ``"response": null`` and an ``error`` (``code``,
``message``, and the ``line`` number). A 429 from the tenant's rate limits or a 503 (not
ready, draining, the queue full) is no answer: the line is tried again later. Duplicate
``custom_id`` values fail the batch at validation (``errors.data``), as OpenAI does.
Cancelling: workers skip the batch's remaining lines and cancel its running ones (they
watch its status in Redis, whichever replica took the cancel), which get a
``batch_cancelled`` entry; past ``batch.completion_window_s``, ``batch_expired``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError, ResponseError

from serving.config import BatchConfig, GatewayConfig
from serving.gateway.batch_scripts import KEEPALIVE, LINE_DONE, TERMINAL, TRANSITION, UNLOCK
from serving.gateway.blobs import BlobNotFoundError, BlobStoreError
from serving.gateway.errors import GatewayError, InternalError, InvalidRequestError, UnauthorizedError
from serving.gateway.files import FileNotFound, Files, NotEnabledError, StorageUnavailableError, blob_key
from serving.gateway.tenants import PriorityClass, Tenant
from serving.gateway.validation import parse_json_body
from serving.metrics import GatewayMetrics
from serving.redis_conn import text
from serving.tasks import cancel_and_wait, raise_if_cancelling
from serving.wire import Endpoint, aclose_quietly, dumps

if TYPE_CHECKING:
    from serving.gateway.service import Answer

__all__ = [
    "ENDPOINTS",
    "BatchNotFound",
    "BatchWorker",
    "Batches",
    "BatchesOff",
    "BatchesPort",
    "InputLine",
    "parse_input",
]

log = logging.getLogger("oss_serving.batches")

REDIS_DOWN = (RedisError, OSError, asyncio.TimeoutError)

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint.chat,
    "/v1/completions": Endpoint.completions,
    "/v1/responses": Endpoint.responses,
}
"""The batch endpoints served here, and the pipeline endpoint of each."""

GROUP = "workers"
STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
LINE_OUTCOMES = ("completed", "failed", "invalid", "cancelled", "expired", "retried", "duplicate")
"""The ``outcome`` label of ``oss_serving_batch_lines_total``."""
MAX_ERRORS = 100
"""Validation errors listed in a failed batch's ``errors.data`` (the first ones)."""
MAX_METADATA = 16
LOCK_TTL_MS = 120_000
"""How long a finalizer's lock lives: another replica takes over after it, if it died."""
RETRY_MAX_S = 30.0
"""Longest wait before a line that got 429 or 503 is tried again."""

_ANSWERED = frozenset({"completed", "failed", "expired", "cancelled"})
_TIMESTAMPS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


# ------------------------------------------------------------------ errors
class BatchNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"No batch found with id '{batch_id[:200]}'.", code="batch_not_found")


class BatchConflictError(GatewayError):
    status = 409
    type = "invalid_request_error"


def _unavailable() -> StorageUnavailableError:
    return StorageUnavailableError("The batch store", "batches_unavailable")


# ------------------------------------------------------------------ the input file
@dataclass(frozen=True)
class InputLine:
    """One non-blank line of an input file: where it is, and what is wrong with it."""

    number: int
    """Its line number in the file (from 1)."""
    offset: int
    length: int
    custom_id: str | None
    error: dict[str, Any] | None = None
    """``{code, message, param, line}`` when the line cannot run (an error-file entry)."""
    model: str | None = None


def _line_error(number: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": number}


def line_limits(config: GatewayConfig) -> GatewayConfig:
    """The limits of a line: the request's own, one level deeper (the line wraps its body)."""
    return config.model_copy(update={"max_json_depth": config.max_json_depth + 1})


def parse_input(data: bytes, url: str, config: GatewayConfig) -> list[InputLine]:
    """Every non-blank line of ``data`` checked for a batch of ``url`` (CPU work: call it
    in a thread for large files)."""
    limits = line_limits(config)
    lines: list[InputLine] = []
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        start, offset = offset, offset + len(raw) + 1
        if raw.strip():
            lines.append(_check_line(number, start, raw, url, limits, config.max_body_bytes))
    return lines


def _check_line(
    number: int, offset: int, raw: bytes, url: str, limits: GatewayConfig, max_bytes: int
) -> InputLine:
    def bad(code: str, message: str, param: str | None = None, custom_id: str | None = None) -> InputLine:
        return InputLine(number, offset, len(raw), custom_id, _line_error(number, code, message, param))

    try:
        line = parse_json_body(raw, limits)
    except InvalidRequestError as exc:
        if exc.code == "invalid_json":
            return bad("invalid_json_line", "This line is not parseable as valid JSON.")
        return bad(exc.code or "invalid_request", exc.message, exc.param)
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_required_parameter", "Missing required parameter: 'custom_id'.", "custom_id")
    if line.get("method") != "POST":
        return bad("invalid_method", "The method of a batch request must be 'POST'.", "method", custom_id)
    if line.get("url") != url:
        return bad(
            "url_mismatch",
            f"The URL provided for this request does not match the batch endpoint ({url}).",
            "url",
            custom_id,
        )
    body = line.get("body")
    if not isinstance(body, dict):
        return bad(
            "missing_required_parameter", "Missing required parameter: 'body' (an object).", "body", custom_id
        )
    if len(raw) > max_bytes:
        return bad(
            "request_too_large",
            f"The request is larger than the configured limit of {max_bytes} bytes.",
            "body",
            custom_id,
        )
    model = body.get("model")
    return InputLine(number, offset, len(raw), custom_id, None, model if isinstance(model, str) else None)


def _duplicates(lines: list[InputLine]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    errors = []
    for line in lines:
        if line.custom_id is None:
            continue
        if line.custom_id in seen:
            errors.append(
                _line_error(
                    line.number,
                    "duplicate_custom_id",
                    "The custom_id for this request is a duplicate of another request. The custom_id "
                    "parameter must be unique for each request in a batch.",
                    "custom_id",
                )
            )
        seen.add(line.custom_id)
    return errors


def output_line(custom_id: str | None, status: int, request_id: str, body: Any) -> str:
    """One line of an output or error file for an answered request (OpenAI's shape)."""
    return dumps(
        {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def error_line(custom_id: str | None, error: Mapping[str, Any]) -> str:
    """One line of an error file for a request that got no answer (``response`` null)."""
    shown = {k: error[k] for k in ("code", "message", "param", "line") if error.get(k) is not None}
    return dumps(
        {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": shown}
    )


def _file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file: the same every time it is written."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


def _ranked(value: Any) -> tuple[int, str]:
    """A stored result: ``"<line number> <JSON line>"``."""
    number, _, line = text(value).partition(" ")
    return (int(number) if number.isdigit() else 0), line


# ------------------------------------------------------------------ the ports
class BatchesPort(Protocol):
    """The Batch API as the routes use it (:class:`Batches`, or :class:`BatchesOff`)."""

    async def create(self, tenant: Tenant, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def list(self, tenant: str, *, after: str | None, limit: int) -> dict[str, Any]: ...

    async def retrieve(self, tenant: str, batch_id: str) -> dict[str, Any]: ...

    async def cancel(self, tenant: str, batch_id: str) -> dict[str, Any]: ...


class BatchesOff:
    """The Batch API turned off: every call is a 400 ``not_enabled``."""

    async def create(self, tenant: Tenant, body: Mapping[str, Any]) -> dict[str, Any]:
        raise NotEnabledError()

    async def list(self, tenant: str, *, after: str | None, limit: int) -> dict[str, Any]:
        raise NotEnabledError()

    async def retrieve(self, tenant: str, batch_id: str) -> dict[str, Any]:
        raise NotEnabledError()

    async def cancel(self, tenant: str, batch_id: str) -> dict[str, Any]:
        raise NotEnabledError()


# ------------------------------------------------------------------ the batches
class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:lines"
        self.active = f"{prefix}:active"
        self.statuses = f"{prefix}:statuses"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{batch_id}"

    def out(self, batch_id: str) -> str:
        return f"{self.prefix}:o:{batch_id}"

    def err(self, batch_id: str) -> str:
        return f"{self.prefix}:e:{batch_id}"

    def invalid(self, batch_id: str) -> str:
        return f"{self.prefix}:x:{batch_id}"

    def lock(self, batch_id: str) -> str:
        return f"{self.prefix}:fin:{batch_id}"

    def tenant(self, tenant: str) -> str:
        return f"{self.prefix}:t:{tenant}"


@dataclass(frozen=True)
class BatchMeta:
    """What a worker needs to know of a line's batch."""

    id: str
    tenant: str
    status: str
    endpoint: Endpoint
    input_key: str
    expires_at: float

    def stopping(self, now: float) -> str | None:
        """Why the batch's lines must not run any more (``cancelled``, ``expired``), or None."""
        if self.status in ("cancelling", "cancelled"):
            return "cancelled"
        if self.status in TERMINAL or self.status == "finalizing":
            return "expired" if self.status == "expired" else "cancelled"
        if now >= self.expires_at:
            return "expired"
        return None


class Batches:
    """Batches in Redis: create (validation), list, retrieve, cancel, finalize, sweep."""

    def __init__(
        self,
        redis: Any,
        files: Files,
        config: BatchConfig,
        gateway: GatewayConfig,
        metrics: GatewayMetrics,
    ) -> None:
        self._redis = redis
        self.files = files
        self.config = config
        self._gateway = gateway
        self.metrics = metrics
        self.keys = _Keys(config.key_prefix)
        self._transition = redis.register_script(TRANSITION)
        self._line_done = redis.register_script(LINE_DONE)
        self._keepalive = redis.register_script(KEEPALIVE)
        self._unlock = redis.register_script(UNLOCK)
        for status in STATUSES:
            metrics.batches.labels(status=status)
        for outcome in LINE_OUTCOMES:
            metrics.batch_lines.labels(outcome=outcome)

    # ----------------------------------------------------------------- the API
    async def create(self, tenant: Tenant, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate the input file and queue its lines; the batch object."""
        input_file_id, url, metadata = _create_params(body)
        try:
            return await self._create(tenant, input_file_id, url, metadata)
        except REDIS_DOWN:
            raise _unavailable() from None

    async def _create(
        self, tenant: Tenant, input_file_id: str, url: str, metadata: dict[str, str] | None
    ) -> dict[str, Any]:
        try:
            info = await self.files.retrieve(tenant.id, input_file_id)
        except FileNotFound:
            raise FileNotFound(input_file_id, param="input_file_id") from None
        if info.get("purpose") != "batch":
            raise InvalidRequestError(
                f"The file {input_file_id} was not uploaded with purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        key = blob_key(tenant.id, input_file_id)
        try:
            data = await self.files.blobs.get(key)
        except BlobNotFoundError:
            raise FileNotFound(input_file_id, param="input_file_id") from None
        except BlobStoreError:
            raise StorageUnavailableError() from None
        lines = await asyncio.to_thread(parse_input, data, url, self._gateway)
        del data
        created_ms = int(time.time() * 1000)
        now = created_ms // 1000
        batch_id = f"batch_{uuid.uuid4().hex}"
        good = [line for line in lines if line.error is None]
        models = {line.model for line in good if line.model}
        record = {
            "id": batch_id,
            "tenant": tenant.id,
            "endpoint": url,
            "input_file_id": input_file_id,
            "input_key": key,
            "completion_window": "24h",
            "created_at": str(now),
            "expires_at": str(now + round(self.config.completion_window_s)),
            "expires_at_ms": str(created_ms + int(self.config.completion_window_s * 1000)),
            "metadata": dumps(metadata) if metadata is not None else "",
            "total": str(len(lines)),
            "remaining": str(len(good)),
            "model": models.pop() if len(models) == 1 else "",
            "status": "validating",
        }
        k = self.keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.batch(batch_id), mapping=record)
            pipe.hincrby(k.statuses, "validating", 1)
            pipe.zadd(k.tenant(tenant.id), {batch_id: created_ms})
            pipe.zadd(k.active, {batch_id: created_ms})
            await pipe.execute()
        failure = self._validation_failure(lines)
        if failure:
            await self._move(batch_id, ("validating",), "failed", failed_at=now, errors=dumps(failure))
            self.metrics.batch_lines.labels(outcome="invalid").inc(sum(1 for line in lines if line.error))
            return await self.retrieve(tenant.id, batch_id)
        invalid = {
            str(line.number): f"{line.number} {error_line(line.custom_id, line.error)}"
            for line in lines
            if line.error
        }
        if invalid:
            await self._redis.hset(k.invalid(batch_id), mapping=invalid)
            self.metrics.batch_lines.labels(outcome="invalid").inc(len(invalid))
        await self._ensure_group()
        await self._move(batch_id, ("validating",), "in_progress", in_progress_at=int(time.time()))
        for start in range(0, len(good), 500):
            async with self._redis.pipeline(transaction=False) as pipe:
                for line in good[start : start + 500]:
                    fields = {
                        "batch": batch_id,
                        "index": line.number,
                        "offset": line.offset,
                        "length": line.length,
                    }
                    pipe.xadd(k.stream, fields)
                await pipe.execute()
        if not good:
            await self.finalize(batch_id)
        return await self.retrieve(tenant.id, batch_id)

    def _validation_failure(self, lines: list[InputLine]) -> dict[str, Any] | None:
        """``errors`` of a batch that fails validation as a whole, or None."""
        data: list[dict[str, Any]] = []
        if not lines:
            data = [
                {
                    "code": "empty_file",
                    "message": "The batch input file is empty.",
                    "param": None,
                    "line": None,
                }
            ]
        elif len(lines) > self.config.max_lines:
            data = [
                {
                    "code": "too_many_tasks",
                    "message": f"The batch input file has {len(lines)} requests; at most "
                    f"{self.config.max_lines} are allowed per batch.",
                    "param": None,
                    "line": None,
                }
            ]
        else:
            data = _duplicates(lines)
        return {"object": "list", "data": data[:MAX_ERRORS]} if data else None

    async def list(self, tenant: str, *, after: str | None, limit: int) -> dict[str, Any]:
        """The tenant's batches, newest first (OpenAI's list object, ``after`` a cursor)."""
        try:
            ids = [text(i) for i in await self._redis.zrevrange(self.keys.tenant(tenant), 0, -1)]
            if after is not None:
                ids = ids[ids.index(after) + 1 :] if after in ids else []
            page = []
            for batch_id in ids[:limit]:
                obj = await self._object(tenant, batch_id)
                if obj is not None:
                    page.append(obj)
        except REDIS_DOWN:
            raise _unavailable() from None
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ids) > limit,
        }

    async def retrieve(self, tenant: str, batch_id: str) -> dict[str, Any]:
        try:
            obj = await self._object(tenant, batch_id)
        except REDIS_DOWN:
            raise _unavailable() from None
        if obj is None:
            raise BatchNotFound(batch_id)
        return obj

    async def cancel(self, tenant: str, batch_id: str) -> dict[str, Any]:
        """``cancelling`` at once; ``cancelled`` once the running lines have stopped."""
        obj = await self.retrieve(tenant, batch_id)
        try:
            moved, current = await self._move(
                batch_id, ("validating", "in_progress"), "cancelling", cancelling_at=int(time.time())
            )
            if not moved and current not in ("cancelling", "cancelled"):
                raise BatchConflictError(
                    f"Cannot cancel a batch with status '{current or obj['status']}'.",
                    code="batch_not_cancellable",
                )
            remaining = await self._redis.hget(self.keys.batch(batch_id), "remaining")
        except REDIS_DOWN:
            raise _unavailable() from None
        if moved and remaining is not None and int(remaining) <= 0:
            await self._finalize_quietly(batch_id)
        return await self.retrieve(tenant, batch_id)

    # ----------------------------------------------------------------- objects
    async def _object(self, tenant: str, batch_id: str) -> dict[str, Any] | None:
        k = self.keys
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.batch(batch_id))
            pipe.hlen(k.out(batch_id))
            pipe.hlen(k.err(batch_id))
            pipe.hlen(k.invalid(batch_id))
            raw, done, errors, invalid = await pipe.execute()
        h = {text(a): text(b) for a, b in raw.items()}
        if h.get("tenant") != tenant or "status" not in h:
            return None  # another tenant's batch is as absent as one that does not exist
        status = h["status"]
        if status in _ANSWERED:
            completed, failed = int(h.get("completed") or 0), int(h.get("failed") or 0)
        else:
            completed, failed = int(done), int(errors) + int(invalid)
        metadata = json.loads(h["metadata"]) if h.get("metadata") else None
        obj: dict[str, Any] = {
            "id": h["id"],
            "object": "batch",
            "endpoint": h["endpoint"],
            "errors": json.loads(h["errors"]) if h.get("errors") else None,
            "input_file_id": h["input_file_id"],
            "completion_window": h.get("completion_window", "24h"),
            "status": status,
            "output_file_id": h.get("output_file_id") or None,
            "error_file_id": h.get("error_file_id") or None,
            "created_at": int(h["created_at"]),
        }
        for name in _TIMESTAMPS:
            obj[name] = int(h[name]) if h.get(name) else None
        obj["request_counts"] = {"total": int(h.get("total") or 0), "completed": completed, "failed": failed}
        obj["metadata"] = metadata
        obj["model"] = h.get("model") or None
        tokens = [int(h.get(f"usage_{k}") or 0) for k in ("in", "out", "cached", "reasoning")]
        obj["usage"] = {
            "input_tokens": tokens[0],
            "input_tokens_details": {"cached_tokens": tokens[2]},
            "output_tokens": tokens[1],
            "output_tokens_details": {"reasoning_tokens": tokens[3]},
            "total_tokens": tokens[0] + tokens[1],
        }
        return obj

    async def _move(
        self, batch_id: str, allowed: tuple[str, ...], to: str, **fields: Any
    ) -> tuple[bool, str]:
        """Change the batch's status (atomically, only from ``allowed``), setting ``fields``."""
        k = self.keys
        keys = [k.batch(batch_id), k.statuses, k.active]
        if to in TERMINAL:
            keys += [k.out(batch_id), k.err(batch_id), k.invalid(batch_id)]
        args: list[Any] = [",".join(allowed), to, batch_id]
        for name, value in fields.items():
            args += [name, str(value)]
        moved, current = await self._transition(keys=keys, args=args)
        return bool(moved), text(current)

    async def meta(self, batch_id: str) -> BatchMeta | None:
        h = await self._redis.hmget(
            self.keys.batch(batch_id), ["tenant", "status", "endpoint", "input_key", "expires_at_ms"]
        )
        tenant, status, endpoint, input_key, expires = (text(v) if v is not None else None for v in h)
        if not tenant or not status or endpoint not in ENDPOINTS or not input_key:
            return None
        return BatchMeta(batch_id, tenant, status, ENDPOINTS[endpoint], input_key, int(expires or 0) / 1000)

    async def statuses(self, batch_ids: builtins.list[str]) -> dict[str, tuple[str | None, float]]:
        """The status and expiry of each batch (None: it is gone)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hmget(self.keys.batch(batch_id), ["status", "expires_at_ms"])
            rows = await pipe.execute()
        return {
            b: (text(st) if st is not None else None, int(exp or 0) / 1000)
            for b, (st, exp) in zip(batch_ids, rows, strict=True)
        }

    # ----------------------------------------------------------------- lines
    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def line_done(
        self, entry_id: str, batch_id: str, custom_id: str, target: str, value: str
    ) -> tuple[int, int]:
        """Record one line (``target`` ``o``, ``e`` or ``''`` for none) and release its entry:
        (1 written / 2 already answered / 0 nothing, the batch's remaining lines). The
        answer's tokens are added to the batch's ``usage`` with it, once."""
        k = self.keys
        wrote, left, _ = await self._line_done(
            keys=[k.stream, k.batch(batch_id), k.out(batch_id), k.err(batch_id)],
            args=[GROUP, entry_id, custom_id, target, value, *_line_tokens(value)],
        )
        return int(wrote), int(left)

    # ----------------------------------------------------------------- finalization
    async def finalize(self, batch_id: str) -> str | None:
        """Write the batch's output and error files and set its final status, once (under
        a lock; a finalization that died is redone by the sweeper). The final status, or
        None when another replica holds the lock or there is nothing to finalize."""
        k = self.keys
        token = uuid.uuid4().hex
        if not await self._redis.set(k.lock(batch_id), token, nx=True, px=LOCK_TTL_MS):
            return None
        try:
            return await self._finalize(batch_id)
        finally:
            with contextlib.suppress(*REDIS_DOWN):  # else its TTL releases it
                await self._unlock(keys=[k.lock(batch_id)], args=[token])

    async def _finalize(self, batch_id: str) -> str | None:
        k = self.keys
        raw = await self._redis.hgetall(k.batch(batch_id))
        h = {text(a): text(b) for a, b in raw.items()}
        status = h.get("status")
        if status is None or status in TERMINAL or status == "validating":
            return None
        now = time.time()
        if status == "in_progress":
            await self._move(batch_id, ("in_progress",), "finalizing", finalizing_at=int(now))
        tenant = h["tenant"]
        try:
            lines = await asyncio.to_thread(
                parse_input, await self.files.blobs.get(h["input_key"]), h["endpoint"], self._gateway
            )
        except BlobNotFoundError:
            lines = []  # the input file was deleted: its unanswered lines cannot be named
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.out(batch_id))
            pipe.hgetall(k.err(batch_id))
            pipe.hgetall(k.invalid(batch_id))
            out, err, invalid = await pipe.execute()
        answered = {text(c) for c in out} | {text(c) for c in err}
        outputs = sorted(_ranked(v) for v in out.values())
        errors = sorted([_ranked(v) for v in err.values()] + [_ranked(v) for v in invalid.values()])
        numbers = {number for number, _ in outputs} | {number for number, _ in errors}
        cancelled = status == "cancelling"
        missing = [
            line
            for line in lines
            if line.error is None and line.custom_id not in answered and line.number not in numbers
        ]
        code, message = (
            ("batch_cancelled", "This request could not be executed before the batch was cancelled.")
            if cancelled
            else ("batch_expired", "This request could not be executed before the completion window expired.")
        )
        errors += [
            (line.number, error_line(line.custom_id, {"code": code, "message": message})) for line in missing
        ]
        errors.sort()
        final = "cancelled" if cancelled else ("expired" if missing else "completed")
        fields: dict[str, Any] = {
            "completed": len(outputs),
            "failed": len(errors),
            f"{final}_at": int(time.time()),
        }
        if outputs:
            fields["output_file_id"] = await self._write(tenant, batch_id, "output", outputs)
        if errors:
            fields["error_file_id"] = await self._write(tenant, batch_id, "error", errors)
        moved, _ = await self._move(batch_id, ("in_progress", "finalizing", "cancelling"), final, **fields)
        if moved:
            self.metrics.batch_lines.labels(outcome=code.removeprefix("batch_")).inc(len(missing))
            log.info(
                "batch %s of tenant %s %s: %d answered, %d errors",
                batch_id,
                tenant,
                final,
                len(outputs),
                len(errors),
            )
        return final if moved else None

    async def _write(
        self, tenant: str, batch_id: str, kind: str, lines: builtins.list[tuple[int, str]]
    ) -> str:
        file_id = _file_id(batch_id, kind)
        data = "".join(line + "\n" for _, line in lines).encode()
        await self.files.write_output(tenant, file_id, f"{batch_id}_{kind}.jsonl", data)
        return file_id

    async def _finalize_quietly(self, batch_id: str) -> None:
        try:
            await self.finalize(batch_id)
        except (GatewayError, *REDIS_DOWN, BlobStoreError) as exc:
            log.warning("batch %s: finalization failed (the sweeper retries): %s", batch_id, exc)

    # ----------------------------------------------------------------- the sweeper
    async def sweep(self) -> None:
        """Finish what no line will: batches whose finalizer died, batches whose lines were
        all skipped or lost past their window, a validation that never ended; and the gauges."""
        k = self.keys
        ids = [text(i) for i in await self._redis.zrange(k.active, 0, 999)]
        now = time.time()
        grace = 3 * self.config.claim_idle_s
        for batch_id in ids:
            status, remaining, expires, created = (
                text(v) if v is not None else None
                for v in await self._redis.hmget(
                    k.batch(batch_id), ["status", "remaining", "expires_at_ms", "created_at"]
                )
            )
            if status is None:
                await self._redis.zrem(k.active, batch_id)
            elif status == "validating" and now - int(created or 0) > max(300.0, grace):
                interrupted = {
                    "code": "validation_interrupted",
                    "message": "The validation of the input file was interrupted.",
                    "param": None,
                    "line": None,
                }
                errors = {"object": "list", "data": [interrupted]}
                await self._move(
                    batch_id, ("validating",), "failed", failed_at=int(now), errors=dumps(errors)
                )
            elif status in ("in_progress", "cancelling", "finalizing") and (
                int(remaining or 0) <= 0 or status == "finalizing" or now >= int(expires or 0) / 1000 + grace
            ):
                await self._finalize_quietly(batch_id)
        counts = await self._redis.hgetall(k.statuses)
        seen = {text(a): int(b) for a, b in counts.items()}
        for status in STATUSES:
            self.metrics.batches.labels(status=status).set(seen.get(status, 0))
        first = await self._redis.xrange(k.stream, "-", "+", count=1)
        age = 0.0
        if first:
            millis = text(first[0][0]).partition("-")[0]
            age = max(0.0, now - int(millis) / 1000) if millis.isdigit() else 0.0
        self.metrics.batch_oldest_line_age.set(age)
        await self._forget_dead_consumers()

    async def _forget_dead_consumers(self) -> None:
        """Every replica start adds a consumer to the group: the ones idle for long with
        nothing pending (replicas gone) are removed (one with pending lines never is)."""
        idle_ms = max(3600.0, 10 * self.config.claim_idle_s) * 1000
        try:
            consumers = await self._redis.xinfo_consumers(self.keys.stream, GROUP)
        except ResponseError:
            return  # no stream or group yet
        for consumer in consumers:
            if int(consumer.get("pending", 1)) == 0 and int(consumer.get("idle", 0)) > idle_ms:
                await self._redis.xgroup_delconsumer(self.keys.stream, GROUP, consumer["name"])


def _metadata_pair(key: Any, value: Any) -> bool:
    return isinstance(key, str) and len(key) <= 64 and isinstance(value, str) and len(value) <= 512


def _create_params(body: Mapping[str, Any]) -> tuple[str, str, dict[str, str] | None]:
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise InvalidRequestError(
            "Missing required parameter: 'input_file_id'.",
            param="input_file_id",
            code="missing_required_parameter",
        )
    url = body.get("endpoint")
    if url not in ENDPOINTS:
        raise InvalidRequestError(
            f"Invalid 'endpoint': {str(url)[:100]!r}; batches here support {', '.join(ENDPOINTS)}.",
            param="endpoint",
            code="invalid_value",
        )
    if body.get("completion_window") != "24h":
        raise InvalidRequestError(
            "Invalid 'completion_window': only '24h' is supported.",
            param="completion_window",
            code="invalid_value",
        )
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA
        or not all(_metadata_pair(a, b) for a, b in metadata.items())
    ):
        raise InvalidRequestError(
            "Invalid 'metadata': at most 16 pairs of strings, keys up to 64 characters, values up to 512.",
            param="metadata",
            code="invalid_value",
        )
    return input_file_id, str(url), metadata


# ------------------------------------------------------------------ the worker
Submit = Callable[[Endpoint, dict[str, Any], Tenant, str], Awaitable["Answer"]]


@dataclass
class _Running:
    entry_id: str
    batch_id: str
    task: asyncio.Task[None]
    work: asyncio.Task[tuple[str, str, str]] | None = None
    stop: str | None = None
    """Why its work was cancelled: ``cancelled`` or ``expired`` (skip it), ``lost`` (another
    replica owns it now: leave it)."""


@dataclass
class _Entry:
    id: str
    batch_id: str
    index: int
    offset: int
    length: int


@dataclass
class _Backoff:
    base_s: float = 0.5
    max_s: float = RETRY_MAX_S
    attempt: int = field(default=0)

    def next(self, hint_s: float | None = None) -> float:
        self.attempt += 1
        wait = min(self.max_s, self.base_s * 2 ** min(self.attempt - 1, 10))
        if hint_s is not None:
            wait = min(self.max_s, max(wait, hint_s))
        return float(wait * random.uniform(0.8, 1.2))

    def reset(self) -> None:
        self.attempt = 0


class BatchWorker:
    """Runs batch lines on one gateway replica (see the module docstring): started and
    stopped with the gateway service."""

    def __init__(
        self,
        batches: Batches,
        submit: Submit,
        tenant_of: Callable[[str], Tenant | None],
        *,
        consumer: str | None = None,
    ) -> None:
        self._batches = batches
        self._submit = submit
        self._tenant_of = tenant_of
        self.config = batches.config
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._running: dict[str, _Running] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._metrics = batches.metrics
        self._cursor = "0-0"

    @property
    def running(self) -> int:
        """Lines this worker runs now."""
        return len(self._running)

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="oss-serving-batch-worker")
            self._watch_task = asyncio.create_task(self._watch(), name="oss-serving-batch-watch")

    async def stop(self, *, hand_back: bool = True) -> None:
        """Stop claiming, cancel the running lines (unacknowledged: their claims are handed
        back at once, so another replica takes them over without waiting). Without
        ``hand_back`` they stay claimed until ``batch.claim_idle_s`` has passed, as when a
        replica dies."""
        loop, self._loop_task = self._loop_task, None
        watch, self._watch_task = self._watch_task, None
        await cancel_and_wait(loop)
        await cancel_and_wait(watch)
        running = list(self._running.values())
        for line in running:
            line.task.cancel()
        if running:
            await asyncio.wait([line.task for line in running], timeout=5.0)
        if running and hand_back:
            idle_ms = int(self.config.claim_idle_s * 1000) * 10
            with contextlib.suppress(*REDIS_DOWN):  # else they are taken over after batch.claim_idle_s
                await self._batches._keepalive(
                    keys=[self._batches.keys.stream],
                    args=[GROUP, self.consumer, idle_ms, *[r.entry_id for r in running]],
                )
        self._running.clear()

    # ----------------------------------------------------------------- claiming
    async def _loop(self) -> None:
        backoff = _Backoff(max_s=5.0)
        next_autoclaim = 0.0
        while True:
            # The Redis client can swallow a cancellation that arrives mid-command: stop here.
            raise_if_cancelling()
            try:
                free = self.config.concurrency_per_replica - len(self._running)
                entries: list[_Entry] = []
                if free > 0:
                    if time.monotonic() >= next_autoclaim:
                        entries += await self._autoclaim(free)
                        next_autoclaim = time.monotonic() + self.config.claim_idle_s / 3
                    if len(entries) < free:
                        entries += await self._read(free - len(entries))
                for entry in entries:
                    self._dispatch(entry)
                backoff.reset()
                if entries and len(self._running) < self.config.concurrency_per_replica:
                    continue
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.config.poll_interval_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            except REDIS_DOWN as exc:
                raise_if_cancelling()  # a cancellation the client turned into an error
                wait = backoff.next()
                log.debug("batch worker: Redis unavailable (%s); again in %.1f s", exc, wait)
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                raise
            except Exception:
                raise_if_cancelling()
                log.exception("batch worker: unexpected error; continuing")
                await asyncio.sleep(backoff.next())

    async def _read(self, count: int) -> list[_Entry]:
        keys = self._batches.keys
        try:
            reply = await self._batches._redis.xreadgroup(
                GROUP, self.consumer, {keys.stream: ">"}, count=count
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._batches._ensure_group()  # a new (or emptied) Redis
            return []
        if isinstance(reply, dict):
            reply = list(reply.items())
        entries: list[_Entry] = []
        for _, messages in reply or []:
            entries += [e for e in (_entry(i, f) for i, f in messages) if e is not None]
        return entries

    async def _autoclaim(self, count: int) -> list[_Entry]:
        keys = self._batches.keys
        try:
            reply = await self._batches._redis.xautoclaim(
                keys.stream,
                GROUP,
                self.consumer,
                int(self.config.claim_idle_s * 1000),
                self._cursor,
                count=count,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._batches._ensure_group()
            return []
        # the scan goes on from where it stopped next time (a long list of pending lines)
        self._cursor = text(reply[0]) if reply else "0-0"
        messages = reply[1] if isinstance(reply, (list, tuple)) and len(reply) > 1 else []
        entries = [e for e in (_entry(i, f) for i, f in messages if f) if e is not None]
        if entries:
            log.info("batch worker %s took over %d lines of stopped workers", self.consumer, len(entries))
        return entries

    def _dispatch(self, entry: _Entry) -> None:
        if entry.id in self._running:
            return
        task = asyncio.create_task(self._line(entry), name=f"oss-serving-batch-line-{entry.id}")
        self._running[entry.id] = _Running(entry.id, entry.batch_id, task)

    # ----------------------------------------------------------------- watching
    async def _watch(self) -> None:
        """Keep the running lines' claims alive, stop the lines of cancelled or expired
        batches, and sweep."""
        period = min(self.config.claim_idle_s / 3, 1.0)
        next_sweep = 0.0
        while True:
            raise_if_cancelling()  # (see _loop)
            await asyncio.sleep(period)
            try:
                await self._watch_once()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + max(period, min(self.config.claim_idle_s, 10.0))
                    await self._batches.sweep()
            except REDIS_DOWN as exc:
                raise_if_cancelling()
                log.debug("batch watch: Redis unavailable (%s)", exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                raise_if_cancelling()
                log.exception("batch watch: unexpected error; continuing")

    async def _watch_once(self) -> None:
        running = [r for r in self._running.values() if r.stop is None]
        if not running:
            return
        statuses = await self._batches.statuses(sorted({r.batch_id for r in running}))
        now = time.time()
        for line in running:
            status, expires = statuses.get(line.batch_id, (None, 0.0))
            if status is None or status in ("cancelling", "cancelled"):
                self._stop(line, "cancelled")
            elif status in TERMINAL or now >= expires:
                self._stop(line, "expired")
        live = [r.entry_id for r in running if r.stop is None]
        if live:
            lost = await self._batches._keepalive(
                keys=[self._batches.keys.stream], args=[GROUP, self.consumer, 0, *live]
            )
            for entry_id in lost or []:
                taken = self._running.get(text(entry_id))
                if taken is not None:
                    log.warning("batch line %s: another replica took it over; stops here", taken.entry_id)
                    self._stop(taken, "lost")

    def _stop(self, line: _Running, why: str) -> None:
        line.stop = why
        if line.work is not None:
            line.work.cancel()

    # ----------------------------------------------------------------- one line
    async def _line(self, entry: _Entry) -> None:
        running = self._running[entry.id]
        try:
            meta = await self._retry(lambda: self._batches.meta(entry.batch_id))
            why = "cancelled" if meta is None else meta.stopping(time.time())
            result: tuple[str, str, str] = ("", "", "")
            if meta is not None and why is None:
                running.work = asyncio.create_task(self._execute(entry, meta))
                if running.stop is not None:
                    running.work.cancel()
                await asyncio.wait({running.work})
                why = running.stop
                if why is None:
                    result = self._result_of(entry, running.work)
            if why == "lost":
                return
            if why is not None:
                self._metrics.batch_lines.labels(outcome=why).inc()
            await self._record(entry, *result)
        except asyncio.CancelledError:
            if running.work is not None:
                running.work.cancel()
                await asyncio.wait({running.work})
            raise
        except Exception:
            log.exception("batch line %s of %s failed; it will run again", entry.id, entry.batch_id)
        finally:
            self._running.pop(entry.id, None)
            self._wake.set()

    def _result_of(self, entry: _Entry, work: asyncio.Task[tuple[str, str, str]]) -> tuple[str, str, str]:
        """What ``work`` produced; an unexpected failure of the gateway is an error entry
        (a 500, as a client would have had), not a line run again and again."""
        exc = work.exception()
        if exc is None:
            return work.result()
        log.error("batch line %s of %s: internal error", entry.id, entry.batch_id, exc_info=exc)
        error = {"code": "internal_error", "message": "The line could not be run (an internal error).",
                 "line": entry.index}  # fmt: skip
        return f"#{entry.index}", "e", f"{entry.index} {error_line(None, error)}"

    async def _record(self, entry: _Entry, custom_id: str, target: str, value: str) -> None:
        wrote, left = await self._retry(
            lambda: self._batches.line_done(entry.id, entry.batch_id, custom_id, target, value)
        )
        if wrote == 1:
            self._metrics.batch_lines.labels(outcome="completed" if target == "o" else "failed").inc()
        elif wrote == 2:
            self._metrics.batch_lines.labels(outcome="duplicate").inc()
        if left == 0:
            await self._batches._finalize_quietly(entry.batch_id)

    async def _retry(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` until Redis answers (backing off while it is down)."""
        backoff = _Backoff(max_s=5.0)
        while True:
            raise_if_cancelling()  # (see _loop)
            try:
                return await call()
            except REDIS_DOWN as exc:
                raise_if_cancelling()
                wait = backoff.next()
                log.debug("batch line: Redis unavailable (%s); again in %.1f s", exc, wait)
                await asyncio.sleep(wait)

    async def _execute(self, entry: _Entry, meta: BatchMeta) -> tuple[str, str, str]:
        """Run the line: (custom_id, ``o`` | ``e``, the stored result)."""
        backoff = _Backoff()
        while True:
            try:
                raw = await self._batches.files.blobs.get_range(
                    meta.input_key, entry.offset, entry.offset + entry.length
                )
                break
            except BlobNotFoundError:
                error = {"code": "input_file_deleted", "message": "The batch's input file was deleted.",
                         "line": entry.index}  # fmt: skip
                return f"#{entry.index}", "e", f"{entry.index} {error_line(None, error)}"
            except BlobStoreError as exc:
                wait = backoff.next()
                log.warning("batch line %s: the blob store failed (%s); again in %.1f s", entry.id, exc, wait)
                await asyncio.sleep(wait)
        line = parse_json_body(raw, line_limits(self._batches._gateway))
        custom_id = str(line.get("custom_id"))
        body = dict(line["body"])
        backoff.reset()
        while True:
            request_id = f"req_{uuid.uuid4().hex}"
            status, answer, retry_after = await self._answer(meta, body, request_id)
            if retry_after is not None:
                self._metrics.batch_lines.labels(outcome="retried").inc()
                await asyncio.sleep(backoff.next(retry_after))
                continue
            target = "o" if 200 <= status < 300 else "e"
            return custom_id, target, f"{entry.index} {output_line(custom_id, status, request_id, answer)}"

    async def _answer(
        self, meta: BatchMeta, body: dict[str, Any], request_id: str
    ) -> tuple[int, Any, float | None]:
        """The status and body of one run of a line, and when to run it again instead (429
        and 503: seconds, at least; None: this is its answer)."""
        tenant = self._tenant_of(meta.tenant)
        error: GatewayError
        if tenant is None:
            error = UnauthorizedError(f"The tenant '{meta.tenant}' of this batch is unknown or was revoked.")
            return error.status, error.body(request_id), None
        if body.get("stream"):
            error = InvalidRequestError(
                "Streaming is not supported in batch requests.", param="stream", code="unsupported_parameter"
            )
            return error.status, error.body(request_id), None
        lane = tenant.model_copy(update={"priority": PriorityClass.batch})
        try:
            answer = await self._submit(meta.endpoint, body, lane, request_id)
        except GatewayError as exc:
            if _retryable(exc):
                hint = exc.headers.get("Retry-After", "")
                return exc.status, None, float(hint) if hint.replace(".", "", 1).isdigit() else 0.0
            return exc.status, exc.body(request_id, self._batches._gateway.max_error_message_chars), None
        if answer.stream is not None:  # never asked for (stream is refused above): close it
            await aclose_quietly(answer.stream)
            error = InternalError()
            return error.status, error.body(request_id), None
        assert answer.json is not None
        return answer.json.status, answer.json.body, None


def _line_tokens(value: str) -> tuple[int, int, int, int]:
    """Input, output, cached input and reasoning tokens of a recorded line's answer (its
    ``usage``, in the chat/completions or the Responses shape; zeros when it has none)."""
    _, _, raw = value.partition(" ")
    try:
        line = json.loads(raw)
        usage = line["response"]["body"]["usage"]
    except (ValueError, KeyError, TypeError):
        return 0, 0, 0, 0
    if not isinstance(usage, dict):
        return 0, 0, 0, 0

    def count(key: str, details: str | None = None, inner: str = "") -> int:
        if details is None:
            value = usage.get(key)
        else:
            nested = usage.get(details)
            value = nested.get(inner) if isinstance(nested, dict) else None
        return value if isinstance(value, int) and value > 0 else 0

    if "input_tokens" in usage:  # Responses
        return (
            count("input_tokens"),
            count("output_tokens"),
            count("", "input_tokens_details", "cached_tokens"),
            count("", "output_tokens_details", "reasoning_tokens"),
        )
    return (
        count("prompt_tokens"),
        count("completion_tokens"),
        count("", "prompt_tokens_details", "cached_tokens"),
        count("", "completion_tokens_details", "reasoning_tokens"),
    )


def _retryable(exc: GatewayError) -> bool:
    """No answer yet: the tenant's rate limits (429) or the service not available now (503)."""
    return (exc.status == 429 and exc.code == "rate_limit_exceeded") or exc.status == 503


def _entry(entry_id: Any, fields: Any) -> _Entry | None:
    if not isinstance(fields, dict):
        return None
    f = {text(a): text(b) for a, b in fields.items()}
    try:
        return _Entry(text(entry_id), f["batch"], int(f["index"]), int(f["offset"]), int(f["length"]))
    except (KeyError, ValueError):
        return None
