"""Prompt caching in the gateway's request path: one object, a few calls from ``GatewayService.run``.

``PromptCaching.begin(ctx)`` gives a :class:`PromptCachingRequest` that the service calls
at fixed points::

    pc = prompt_caching.begin(ctx)
    hit = await pc.lookup()            # after auth and limits, before admission
    if hit is not None:
        return hit                     # a cached answer: no admission, no engine
    ...                                # admission
    await pc.route(headers)            # routing hints into the engine call's headers
    stream = engine.generate(endpoint, body, headers)
    first = ...                        # first item from the engine
    pc.routed(headers)                 # the router's choice -> shared prefix index
    return pc.answer(first), None      # non-streaming: count usage, maybe store
    return None, pc.stream(relay)      # streaming: count usage, maybe store

Each piece is optional through configuration: prefix routing (``routing``) and the
response cache (``response_cache``, plus the tenant's and the request's opt-in).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from serving.config import ResponseCacheConfig, RoutingConfig
from serving.engine.protocol import EngineJSON
from serving.engine.routing_hints import ROUTED_REASON, ROUTED_REPLICA
from serving.gateway.context import RequestContext
from serving.gateway.prefix import PrefixIndex
from serving.gateway.response_cache import CachePlan, ResponseCache
from serving.gateway.routing import PrefixRouting, RoutePlan
from serving.metrics import GatewayMetrics
from serving.wire import GATEWAY_HEADER, REPLICA_HEADER, ROUTE_HEADER, aclose_stream

__all__ = ["PromptCaching", "PromptCachingRequest"]


class PromptCaching:
    """Prefix-affinity routing and the response cache of one gateway replica."""

    def __init__(
        self,
        routing: RoutingConfig,
        response_cache: ResponseCacheConfig,
        metrics: GatewayMetrics,
        redis: Any | None,
    ) -> None:
        self._metrics = metrics
        self._decision_headers = routing.decision_headers
        self.gateway_id = uuid.uuid4().hex[:12]
        """This gateway replica, as ``x-oss-serving-gateway`` names it."""
        index = PrefixIndex(redis, routing) if redis is not None and routing.enabled else None
        self.routing = PrefixRouting(routing, index, metrics)
        self.cache = (
            ResponseCache(redis, response_cache, metrics)
            if redis is not None and response_cache.enabled
            else None
        )

    def identity_headers(self) -> dict[str, str]:
        """``x-oss-serving-gateway`` for answers that reach no engine (with decision headers on)."""
        return {GATEWAY_HEADER: self.gateway_id} if self._decision_headers else {}

    def begin(self, ctx: RequestContext) -> PromptCachingRequest:
        return PromptCachingRequest(self, ctx)

    async def drain(self) -> None:
        """Wait for background index updates and cache stores (tests, shutdown)."""
        await self.routing.drain()
        if self.cache is not None:
            await self.cache.drain()

    async def stop(self) -> None:
        await self.routing.stop()


class PromptCachingRequest:
    """Prompt caching for one request (see the module docstring for the call order)."""

    def __init__(self, owner: PromptCaching, ctx: RequestContext) -> None:
        self._owner = owner
        self._ctx = ctx
        self._route: RoutePlan | None = None
        self._store: CachePlan | None = None

    async def lookup(self) -> tuple[EngineJSON | None, AsyncIterator[str] | None] | None:
        """A cached answer, or None (then remember whether to store the answer)."""
        cache = self._owner.cache
        if cache is None:
            return None
        found = await cache.lookup(self._ctx)
        if found is None:
            return None
        answer, stream, plan = found
        if plan is not None:
            self._store = plan
            return None
        ctx = self._ctx
        self._owner._metrics.requests.labels(model=ctx.model, endpoint=ctx.endpoint.value, status="200").inc()
        return answer, stream

    async def route(self, headers: dict[str, str]) -> None:
        self._route = await self._owner.routing.prepare(self._ctx, headers)

    def routed(self, headers: dict[str, str]) -> None:
        self._owner.routing.routed(self._route, headers)
        if self._owner._decision_headers:
            out = self._ctx.response_headers
            out[GATEWAY_HEADER] = self._owner.gateway_id
            if (replica := headers.get(ROUTED_REPLICA)) is not None:
                out[REPLICA_HEADER] = replica
            if (reason := headers.get(ROUTED_REASON)) is not None:
                out[ROUTE_HEADER] = reason

    def answer(self, answer: EngineJSON) -> EngineJSON:
        if answer.status == 200:
            self._owner.routing.observe_answer(self._ctx.model, answer.body)
            if self._store is not None and self._owner.cache is not None:
                self._owner.cache.store_json(self._store, answer)
        return answer

    def stream(self, relay: AsyncIterator[str]) -> AsyncIterator[str]:
        observed = self._observe(relay)
        if self._store is not None and self._owner.cache is not None:
            return self._owner.cache.tee(self._store, observed)
        return observed

    async def _observe(self, relay: AsyncIterator[str]) -> AsyncIterator[str]:
        routing, model = self._owner.routing, self._ctx.model
        try:
            async for text in relay:
                routing.observe_sse(model, text)
                yield text
        finally:
            await aclose_stream(relay)
