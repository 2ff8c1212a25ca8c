"""The production :class:`EngineClient`: Ray Serve deployment handles to the engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from serving.engine.protocol import Endpoint, EngineClient, EngineJSON, EngineSSE, EngineStats
from serving.engine.routing_hints import HINT_AVOID, HINT_ONLY

__all__ = ["RayEngineClient"]


class RayEngineClient(EngineClient):
    """Calls one model's engine deployment (``OssLLMServer``/``OssDPServer``) by handle."""

    def __init__(self, handle: Any) -> None:
        # Configure the streaming handle once: every .options() call builds a new handle
        # with its own metrics pusher and long-poll client.
        self._stream = handle.options(stream=True, method_name="generate")
        self._health = handle.options(method_name="check_health")
        self._stats = handle.options(method_name="stats")
        self._probe = handle.options(method_name="probe")

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        response = self._stream.remote(endpoint.value, body, headers)
        try:
            async for item in response:
                yield item
        finally:
            # Cancelling the response generator cancels the replica's request, and with it
            # vLLM's generation (Ray Serve propagates the cancellation).
            response.cancel()

    async def check_health(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._health.remote(), timeout=timeout_s)

    async def stats(self, timeout_s: float) -> EngineStats:
        raw: dict[str, Any] = await asyncio.wait_for(self._stats.remote(), timeout=timeout_s)
        return _stats(raw)

    async def probe(
        self, timeout_s: float, *, only: str | None = None, avoid: Sequence[str] = ()
    ) -> EngineStats:
        hints = {HINT_ONLY: only} if only else {HINT_AVOID: ",".join(avoid)} if avoid else {}
        if not hints:
            return await self.stats(timeout_s)
        response = self._probe.remote(hints)
        try:
            raw: dict[str, Any] = await asyncio.wait_for(response, timeout=timeout_s)
        except BaseException:
            response.cancel()  # a replica that is gone is never chosen: drop the pending call
            raise
        return _stats(raw)


def _stats(raw: dict[str, Any]) -> EngineStats:
    return EngineStats(
        unfinished_requests=int(raw.get("unfinished_requests", 0)),
        replica_id=str(raw["replica_id"]) if raw.get("replica_id") else None,
        max_num_seqs=int(raw["max_num_seqs"]) if raw.get("max_num_seqs") else None,
        pid=int(raw["pid"]) if raw.get("pid") else None,
    )
