"""A fake engine implementing :class:`EngineClient` (not a mock): scripted answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from serving.engine.protocol import Endpoint, EngineClient, EngineJSON, EngineSSE, EngineStats


class FakeEngine(EngineClient):
    """Answers chat with a fixed text; streams it word by word; can be made unhealthy."""

    def __init__(self, text: str = "The capital of France is Paris.", healthy: bool = True) -> None:
        self.text = text
        self.healthy = healthy
        self.calls: list[tuple[Endpoint, dict[str, Any], dict[str, str]]] = []
        self.running = 0
        self.cancelled = 0
        self.chunk_delay_s = 0.0
        self.replica_id = "fake-replica"

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        self.calls.append((endpoint, body, headers))
        words = self.text.split(" ")
        usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
        if not body.get("stream"):
            yield EngineJSON(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return
        self.running += 1
        try:
            for i, word in enumerate(words):
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "delta": {"content": (" " if i else "") + word}, "finish_reason": None}
                    ],
                }
                yield EngineSSE(f"data: {json.dumps(chunk)}\n\n")
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
            final = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [],
                "usage": usage,
            }
            options = body.get("stream_options") or {}
            if options.get("include_usage"):  # as vLLM: the usage chunk only when asked
                yield EngineSSE(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n")
            else:
                yield EngineSSE("data: [DONE]\n\n")
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def check_health(self, timeout_s: float) -> None:
        if not self.healthy:
            raise RuntimeError("engine replica is starting")

    async def stats(self, timeout_s: float) -> EngineStats:
        return EngineStats(unfinished_requests=self.running, replica_id=self.replica_id)
