"""What the generator records about each request, before any metric is computed.

Times are seconds on one monotonic clock (``time.perf_counter``) relative to the run's
origin ``t0``: the instant the first request was scheduled to be sent. Metrics are
derived from these records only (:mod:`loadtest.metrics`), so the same code scores live
runs, simulated runs and the synthetic streams of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Chunk", "ErrorKind", "RequestRecord"]


class ErrorKind:
    """Outcome labels of a request that did not complete with HTTP 200."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    STREAM_ERROR = "stream_error"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"

    @staticmethod
    def http(status: int) -> str:
        """The label of an HTTP error status, e.g. ``http_429``."""
        return f"http_{status}"


#: HTTP statuses that mean the server shed load (rejections, not errors).
REJECTION_STATUSES = frozenset({429, 503})


@dataclass(slots=True)
class Chunk:
    """One server-sent event that carried output.

    ``content`` is final-answer text, ``reasoning`` is reasoning text (gpt-oss
    ``analysis`` channel, streamed by vLLM as ``delta.reasoning_content`` or
    ``delta.reasoning``), ``tool`` marks a tool-call delta. ``tokens`` is how many
    output tokens the chunk carried; the client fills it after the run (from the
    tokenizer, or 1 per chunk when no tokenizer is given).
    """

    t: float
    content: str = ""
    reasoning: str = ""
    tool: bool = False
    tokens: int = 1

    @property
    def has_token(self) -> bool:
        """True when the chunk carried any output (any channel)."""
        return bool(self.content or self.reasoning or self.tool)

    @property
    def has_content(self) -> bool:
        """True when the chunk carried final-answer output (content or a tool call)."""
        return bool(self.content or self.tool)


@dataclass(slots=True)
class RequestRecord:
    """Everything observed about one request.

    ``scheduled`` is when the schedule said to send it; ``sent`` is when the client
    actually began sending (the difference is the send lag); ``end`` is the arrival of
    the last byte (or the moment of failure).
    """

    index: int
    scheduled: float
    stream: bool = True
    sent: float | None = None
    end: float | None = None
    status: int | None = None
    error: str | None = None
    chunks: list[Chunk] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    requested_input_tokens: int | None = None
    requested_output_tokens: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    first_event: float | None = None
    """Arrival of the stream's first event with a choice in it, text or not (vLLM sends its
    role chunk with the first generated token): the first token's time when a stream holds
    its text back (a harmony model whose output opens no channel streams one chunk at the end)."""

    @property
    def ok(self) -> bool:
        """Completed with HTTP 200 and no error."""
        return self.status == 200 and self.error is None and self.end is not None

    @property
    def outcome(self) -> str:
        """``ok``, ``http_<status>``, or one of :class:`ErrorKind`'s labels."""
        if self.ok:
            return "ok"
        if self.error is not None:
            return self.error
        if self.status is not None and self.status != 200:
            return ErrorKind.http(self.status)
        return ErrorKind.INCOMPLETE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (chunks as ``[t, tokens, channel]`` triples)."""
        return {
            "index": self.index,
            "scheduled": self.scheduled,
            "sent": self.sent,
            "end": self.end,
            "status": self.status,
            "error": self.error,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "requested_input_tokens": self.requested_input_tokens,
            "requested_output_tokens": self.requested_output_tokens,
            "tags": dict(self.tags),
            "first_event": self.first_event,
            **({"extra": dict(self.extra)} if self.extra else {}),
            "chunks": [
                [c.t, c.tokens, "content" if c.content else "tool" if c.tool else "reasoning"]
                for c in self.chunks
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        """Inverse of :meth:`to_dict` (chunk text is not kept, only its channel)."""
        chunks = [
            Chunk(
                t=float(t),
                tokens=int(n),
                content="x" if kind == "content" else "",
                reasoning="x" if kind == "reasoning" else "",
                tool=kind == "tool",
            )
            for t, n, kind in data.get("chunks", [])
        ]
        fields = {k: v for k, v in data.items() if k != "chunks"}
        return cls(chunks=chunks, **fields)
