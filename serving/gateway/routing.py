"""Prefix-affinity routing: the gateway's half.

The gateway cannot place a request on an engine replica by itself: Ray Serve's request
router, running inside the gateway process for the engine deployment's handle, does
that. So routing is split in two:

1. :class:`PrefixRouting` (here, plain async Python): renders the prompt, hashes its
   blocks, asks the shared :class:`~serving.gateway.prefix.PrefixIndex` in Redis which
   replicas hold its longest prefix and which replica served its affinity key
   (``prompt_cache_key``, else a session header, else ``user``), and writes that as
   routing hints into the ``headers`` argument of the engine call.
2. ``serving.engine.router.PrefixAffinityRouter`` (the engine deployment's Ray Serve
   request router) reads the hints, adds what only it knows (every replica's live queue
   length, probed from the replicas themselves, so it counts every gateway's requests),
   applies :func:`serving.engine.routing_hints.decide`, and writes the replica it chose
   and why back into the same ``headers`` dict. After the first answer item the gateway
   reads them and records the prompt's blocks under that replica in the index (in the
   background: never before the first byte). The hint names and the rule are the engine
   side's (:mod:`serving.engine.routing_hints`); this module only uses them.

Where this does better than Ray Serve LLM's ``PrefixCacheAffinityRouter``: the index is
in Redis (not one detached actor queried with blocking ``ray.get`` on the routing path),
shared by gateway replicas and kept across gateway restarts; entries expire and each
replica's entries are LRU-bounded (Ray's tree evicts only when asked to); load wins over
affinity past a configurable imbalance (Ray's default threshold is infinite); and
``prompt_cache_key`` / sessions are honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serving.config import RoutingConfig
from serving.engine.routing_hints import (
    HINT_AFFINITY,
    HINT_KEY_REPLICA,
    HINT_STRATEGY,
    REASONS,
    ROUTED_REASON,
    ROUTED_REPLICA,
    format_affinity,
)
from serving.gateway.context import RequestContext
from serving.gateway.prefix import AffinityLookup, PrefixIndex, block_hashes, render_prompt
from serving.metrics import GatewayMetrics
from serving.wire import cached_tokens_in, sse_data_events, usage_of

__all__ = [
    "PrefixRouting",
    "RoutePlan",
    "affinity_key",
]

log = logging.getLogger("oss_serving.routing")


def affinity_key(ctx: RequestContext, config: RoutingConfig) -> str | None:
    """``prompt_cache_key``, else the first configured session header, else ``user``;
    scoped by the tenant's cache salt, so tenants never steer each other's placement."""
    key: str | None = None
    value = ctx.body.get("prompt_cache_key")
    if isinstance(value, str) and value:
        key = "k:" + value
    else:
        header = next(
            (ctx.headers[n.lower()] for n in config.session_headers if ctx.headers.get(n.lower())), None
        )
        user = ctx.body.get("user")
        if header:
            key = "s:" + header
        elif isinstance(user, str) and user:
            key = "u:" + user
    if key is None:
        return None
    return f"{ctx.cache_scope}:{key}" if ctx.cache_scope else key


@dataclass
class RoutePlan:
    """What the gateway asked for one request, kept until the router has chosen."""

    model: str
    hashes: list[str]
    key: str | None
    lookup: AffinityLookup | None


class PrefixRouting:
    """The gateway's half of prefix-affinity routing (see the module docstring)."""

    def __init__(self, config: RoutingConfig, index: PrefixIndex | None, metrics: GatewayMetrics) -> None:
        self._config = config
        self._index = index
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    async def prepare(self, ctx: RequestContext, headers: dict[str, str]) -> RoutePlan | None:
        """Add routing hints for ``ctx`` to ``headers`` (the engine call's third argument)."""
        cfg = self._config
        if not cfg.enabled:
            return None
        headers[HINT_STRATEGY] = cfg.strategy
        if cfg.strategy != "prefix":
            return None
        text = render_prompt(ctx.endpoint, ctx.body)
        plan = RoutePlan(
            model=ctx.model,
            hashes=block_hashes(text, cfg.block_chars, cfg.max_blocks, ctx.cache_scope),
            key=affinity_key(ctx, cfg),
            lookup=None,
        )
        if self._index is None or not self._index.available or (not plan.hashes and plan.key is None):
            return plan  # no index, Redis away (breaker open: routed by load), or nothing to look up
        try:
            plan.lookup = await self._index.lookup(ctx.model, plan.hashes, plan.key)
        except Exception as exc:  # Redis down: route by load, keep serving
            log.warning("prefix index lookup failed: %s", exc)
            self._metrics.prefix_index_errors.inc()
            return plan
        found = plan.lookup
        hit = found.best_blocks >= cfg.min_match_blocks or found.key_replica is not None
        self._metrics.prefix_affinity.labels(model=ctx.model, result="hit" if hit else "miss").inc()
        if found.matched:
            headers[HINT_AFFINITY] = format_affinity(found.matched)
        if found.key_replica:
            headers[HINT_KEY_REPLICA] = found.key_replica
        return plan

    def routed(self, plan: RoutePlan | None, headers: Mapping[str, str]) -> None:
        """The router has chosen (its choice is in ``headers``): count it, update the index."""
        reason = headers.get(ROUTED_REASON)
        replica = headers.get(ROUTED_REPLICA)
        if plan is None or reason is None:
            return
        self._metrics.routing_decisions.labels(
            model=plan.model, reason=reason if reason in REASONS else "fallback"
        ).inc()
        if self._index is None or replica is None or not (plan.hashes or plan.key):
            return
        task = asyncio.create_task(self._record(plan, replica), name="oss-serving-prefix-record")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, plan: RoutePlan, replica: str) -> None:
        assert self._index is not None
        try:
            await self._index.record(plan.model, replica, plan.hashes, plan.key)
        except Exception as exc:
            log.warning("prefix index update failed: %s", exc)
            self._metrics.prefix_index_errors.inc()

    async def drain(self) -> None:
        """Wait for pending index updates (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def observe_answer(self, model: str, body: Mapping[str, Any]) -> None:
        """Count the prompt and cached prompt tokens of a non-streamed answer."""
        self._observe(model, body.get("usage"))

    def observe_sse(self, model: str, text: str) -> None:
        """Count them from a streamed chunk (only chunks carrying usage are parsed)."""
        if '"cached_tokens"' not in text:
            return
        for event in sse_data_events(text):
            self._observe(model, usage_of(event))

    def _observe(self, model: str, usage: Any) -> None:
        counts = cached_tokens_in(usage)
        if counts is None:
            return
        prompt, cached = counts
        self._metrics.prompt_tokens.labels(model=model).inc(prompt)
        self._metrics.cached_prompt_tokens.labels(model=model).inc(cached)
