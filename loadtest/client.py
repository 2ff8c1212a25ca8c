"""Streaming OpenAI-compatible HTTP client that records chunk arrival times.

One :class:`OpenAIClient` per run holds one ``aiohttp`` session with an unbounded
connection pool: the generator never waits for a free connection (a bounded pool would
queue requests inside the client, which is exactly the hidden queueing the metrics must
expose). Chunk token counts are assigned after the run by :func:`assign_chunk_tokens`,
so no tokenizer work happens on the event loop while requests are in flight.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import aiohttp

from loadtest.records import Chunk, ErrorKind, RequestRecord
from loadtest.tokenizer import Tokenizer
from loadtest.workload import PlannedRequest

#: The response header that names the engine replica an oss-serving gateway routed a
#: request to (``routing.decision_headers``); recorded as ``extra["replica"]``, so that a
#: calibration through a fleet rebuilds each request's batch from its own replica's.
REPLICA_HEADER = "x-oss-serving-replica"

__all__ = ["OpenAIClient", "assign_chunk_tokens", "parse_sse_event"]


def parse_sse_event(obj: dict[str, Any], t: float, rec: RequestRecord) -> None:
    """Apply one decoded ``data:`` event of a chat or completions stream to ``rec``."""
    if "error" in obj and not obj.get("choices"):
        rec.error = ErrorKind.STREAM_ERROR
        return
    usage = obj.get("usage")
    if usage:
        _apply_usage(usage, rec)
    if rec.first_event is None and obj.get("choices"):
        rec.first_event = t
    content, reasoning, tool = "", "", False
    for choice in obj.get("choices") or ():
        delta = choice.get("delta")
        if delta is not None:
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            tool = tool or bool(delta.get("tool_calls"))
        else:
            content += choice.get("text") or ""
    if content or reasoning or tool:
        rec.chunks.append(Chunk(t=t, content=content, reasoning=reasoning, tool=tool))


def _apply_usage(usage: dict[str, Any], rec: RequestRecord) -> None:
    rec.prompt_tokens = usage.get("prompt_tokens")
    rec.completion_tokens = usage.get("completion_tokens")
    details = usage.get("completion_tokens_details") or {}
    rec.reasoning_tokens = details.get("reasoning_tokens")
    pdetails = usage.get("prompt_tokens_details") or {}
    rec.cached_tokens = pdetails.get("cached_tokens")


def assign_chunk_tokens(records: Iterable[RequestRecord], tokenizer: Tokenizer | None) -> None:
    """Set each output chunk's token count.

    When the server's ``completion_tokens`` equals the number of output chunks, every
    chunk carried one token (exact). Otherwise each chunk's text is re-tokenized without
    special tokens (at least 1 per chunk; 1 per chunk with no tokenizer), and when the
    server reported a total the counts are scaled to add up to it (largest remainders),
    so the server's usage stays authoritative and the tokenizer only splits it.
    """
    for rec in records:
        out = [c for c in rec.chunks if c.has_token]
        if not out:
            continue
        total = rec.completion_tokens
        if total == len(out):
            counts = [1] * len(out)
        else:
            counts = [max(1, len(tokenizer.encode(c.reasoning + c.content))) if tokenizer else 1 for c in out]
            if total is not None and total >= len(out) and sum(counts) != total:
                counts = _apportion(counts, total)
        for c, n in zip(out, counts, strict=True):
            c.tokens = n


def _apportion(weights: list[int], total: int) -> list[int]:
    """Integers >= 1 proportional to ``weights`` that add up to ``total`` (>= len)."""
    spare = total - len(weights)
    raw = [w * spare / sum(weights) for w in weights]
    out = [1 + int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


class OpenAIClient:
    """Sends :class:`PlannedRequest` s and fills :class:`RequestRecord` s."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use 'async with OpenAIClient(...)'")
        return self._session

    def prepare(self, req: PlannedRequest) -> tuple[bytes, dict[str, str]]:
        """The encoded body and headers of ``req`` (cached on it, so a run can encode every
        request before its first send and keep that work off the schedule)."""
        if req.encoded is None:
            headers = {"Content-Type": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            headers.update(req.headers)
            req.encoded = (json.dumps(req.body, separators=(",", ":")).encode(), headers)
        return req.encoded

    async def send(self, req: PlannedRequest, rec: RequestRecord, t0: float) -> None:
        """Send ``req`` now; times in ``rec`` are relative to ``t0`` (``perf_counter``)."""
        clock = time.perf_counter
        payload, headers = self.prepare(req)
        rec.sent = clock() - t0
        try:
            async with self.session.post(self._base + req.path, data=payload, headers=headers) as resp:
                rec.status = resp.status
                if (replica := resp.headers.get(REPLICA_HEADER)) is not None:
                    rec.extra["replica"] = replica
                if resp.status != 200:
                    await resp.read()
                    rec.end = clock() - t0
                    return
                if req.stream:
                    done = False
                    async for line in resp.content:
                        if not line.startswith(b"data:"):
                            continue
                        t = clock() - t0
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            continue
                        parse_sse_event(json.loads(data), t, rec)
                    rec.end = clock() - t0
                    if not done and rec.error is None:
                        rec.error = ErrorKind.INCOMPLETE
                else:
                    obj = await resp.json(content_type=None)
                    rec.end = clock() - t0
                    if obj.get("usage"):
                        _apply_usage(obj["usage"], rec)
        except TimeoutError:
            rec.error = ErrorKind.TIMEOUT
            rec.end = clock() - t0
        except (aiohttp.ClientError, OSError, ValueError):
            rec.error = ErrorKind.CONNECTION if rec.status is None else ErrorKind.STREAM_ERROR
            rec.end = clock() - t0
        except asyncio.CancelledError:
            rec.error = ErrorKind.CANCELLED
            rec.end = clock() - t0
            raise
