"""The interface between the gateway and the engines.

The gateway never imports Ray or vLLM to talk to an engine: it holds an
:class:`EngineClient` per model. The production client (``serving.engine.ray_client``)
calls Ray Serve deployments; tests inject a fake that implements the same class.

Streaming contract of :meth:`EngineClient.generate`:

- it yields either exactly one :class:`EngineJSON` (a complete non-streaming answer, or
  an error raised before any token), or one or more :class:`EngineSSE` items;
- :class:`EngineSSE` text is verbatim server-sent events (``data: {...}\\n\\n``, or for
  ``/v1/responses`` ``event: ...\\ndata: {...}\\n\\n``), possibly several events joined;
  chat and completions streams end with ``data: [DONE]``; errors after the first event
  arrive in-band as an ``error`` event;
- closing the generator (``aclose()``, or cancelling the task iterating it) cancels the
  engine request: no generation outlives its client.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from serving.wire import Endpoint, EngineJSON, EngineSSE

__all__ = ["Endpoint", "EngineClient", "EngineJSON", "EngineSSE", "EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """What one engine replica reports about itself (the one that answered the call)."""

    unfinished_requests: int
    """Requests the replica's engine is generating right now."""

    replica_id: str | None = None
    """The replica that answered (None where the client has no replicas, e.g. an upstream)."""

    max_num_seqs: int | None = None
    """The most sequences its engine runs at once (vLLM's ``max_num_seqs``), if known."""

    pid: int | None = None
    """The replica's process id (for operators: which process to look at)."""


class EngineClient(ABC):
    """One model's engines as the gateway sees them."""

    @abstractmethod
    def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        """Run one OpenAI request (already validated) and stream its answer.

        ``headers`` is also a side channel with the engine deployment's request router
        (:mod:`serving.engine.routing_hints`): the gateway writes routing hints into the
        dict before the call, and the router, which runs in the caller's process before
        the arguments are sent, writes the replica it chose back into the same dict; the
        caller reads it once the first item has arrived.
        """

    @abstractmethod
    async def check_health(self, timeout_s: float) -> None:
        """Return if at least one engine replica is healthy; raise otherwise."""

    @abstractmethod
    async def stats(self, timeout_s: float) -> EngineStats:
        """Current load as the engines see it."""

    async def probe(
        self, timeout_s: float, *, only: str | None = None, avoid: Sequence[str] = ()
    ) -> EngineStats:
        """Stats of the one replica ``only`` (raise if it does not answer within
        ``timeout_s``, or is gone), or of any replica but those in ``avoid``. Clients
        without replicas ask any engine."""
        return await self.stats(timeout_s)
