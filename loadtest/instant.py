"""A minimal "instant" OpenAI-compatible server for measuring the load generator itself.

Every POST is answered at once with a fixed streamed chat completion (``n`` one-token
chunks, usage, ``[DONE]``) over HTTP/1.1 keep-alive, with a hand-written
``asyncio.Protocol`` so that the server costs far less CPU than the client it measures.
Not an engine: no timing model, no metrics (see ``loadtest.sim`` for that).
"""

from __future__ import annotations

import asyncio
import json

__all__ = ["InstantProtocol", "serve_instant", "streamed_body"]


def streamed_body(n_tokens: int) -> bytes:
    """The SSE body of one answer: a role chunk, ``n_tokens`` content chunks, usage, DONE."""

    def ev(obj: dict[str, object]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    base = {"id": "instant", "object": "chat.completion.chunk", "created": 0, "model": "instant"}
    parts = [ev({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    parts += [ev({**base, "choices": [{"index": 0, "delta": {"content": " x"}}]}) for _ in range(n_tokens)]
    usage = {"prompt_tokens": 1, "completion_tokens": n_tokens, "total_tokens": n_tokens + 1}
    parts.append(ev({**base, "choices": [], "usage": usage}))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


class InstantProtocol(asyncio.Protocol):
    """HTTP/1.1 with Content-Length request bodies; every request gets the same answer."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            head_end = self._buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buf[:head_end].lower()
            length = 0
            pos = head.find(b"content-length:")
            if pos >= 0:
                length = int(
                    head[pos + 15 : head.find(b"\r\n", pos) if head.find(b"\r\n", pos) > 0 else None]
                )
            end = head_end + 4 + length
            if len(self._buf) < end:
                return
            self._buf = self._buf[end:]
            if self._transport is not None:
                self._transport.write(self._response)


async def serve_instant(host: str, port: int, n_tokens: int = 4) -> asyncio.Server:
    """Start the server (the caller closes it)."""
    body = streamed_body(n_tokens)
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: InstantProtocol(response), host, port)
