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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Endpoint", "EngineClient", "EngineJSON", "EngineSSE", "EngineStats"]


class Endpoint(StrEnum):
    """OpenAI endpoints an engine serves."""

    chat = "chat"
    completions = "completions"
    responses = "responses"


@dataclass(frozen=True)
class EngineJSON:
    """A complete JSON answer (or an error) with its HTTP status."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class EngineSSE:
    """One or more server-sent events, verbatim."""

    text: str


@dataclass(frozen=True)
class EngineStats:
    """What an engine deployment reports about itself."""

    replicas: int
    """Replicas that answered."""

    unfinished_requests: int
    """Requests the engines are generating right now (summed over answering replicas)."""

    extra: dict[str, Any] = field(default_factory=dict)


class EngineClient(ABC):
    """One model's engines as the gateway sees them."""

    @abstractmethod
    def generate(
        self, endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[EngineJSON | EngineSSE]:
        """Run one OpenAI request (already validated) and stream its answer."""

    @abstractmethod
    async def check_health(self, timeout_s: float) -> None:
        """Return if at least one engine replica is healthy; raise otherwise."""

    @abstractmethod
    async def stats(self, timeout_s: float) -> EngineStats:
        """Current load as the engines see it."""
