"""The engine deployment's Ray Serve request router: prefix affinity balanced with load.

Ray Serve runs one instance of this router per handle, in the process that calls the
engine deployment (the gateway replica). The gateway's policy puts routing hints in the
``headers`` argument of ``generate(endpoint, body, headers)``; this router reads them from
the pending request, looks up each candidate replica's queue length (Ray's cache of recent
probes, probing the replicas that have no fresh entry), applies
:func:`serving.engine.routing_hints.decide`, and writes the replica it chose and the
reason back into the same dict, where the gateway reads them to update the shared prefix
index. The hints' names and format are defined in :mod:`serving.engine.routing_hints`.

Every gateway request also carries ``HINT_AVOID`` (the replicas its gateway keeps out of
routing after a failure: they are skipped while another replica is left), and a probe of
one quarantined replica carries ``HINT_ONLY``. Requests without strategy hints (routing
off, other callers, health checks) get Ray Serve's default power-of-two-choices routing
among the allowed replicas; deployments with one replica have no router.
"""

from __future__ import annotations

import itertools
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from serving.engine.routing_hints import (
    HINT_AFFINITY,
    HINT_AVOID,
    HINT_KEY_REPLICA,
    HINT_ONLY,
    HINT_STRATEGY,
    ROUTED_REASON,
    ROUTED_REPLICA,
    avoiding,
    decide,
    parse_affinity,
)

__all__ = ["ROUTER_CLASS", "PrefixAffinityRouter", "hints_of"]

ROUTER_CLASS = "serving.engine.router:PrefixAffinityRouter"


_HINTS = (HINT_STRATEGY, HINT_AVOID, HINT_ONLY)


def hints_of(pending_request: Any) -> dict[str, str] | None:
    """The hints dict of a call, if it carries hints: the ``headers`` of
    ``generate(endpoint, body, headers)`` or of ``probe(headers)``."""
    args = getattr(pending_request, "args", None) or []
    for arg in (args[2] if len(args) >= 3 else None, args[0] if len(args) == 1 else None):
        if isinstance(arg, dict) and any(key in arg for key in _HINTS):
            return arg
    return None


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):  # type: ignore[misc]
    """Power of two choices, overridden by prefix affinity or round robin when hinted."""

    def initialize_state(self, imbalance_threshold: int = 8, min_match_blocks: int = 1, **_: Any) -> None:
        self._imbalance_threshold = imbalance_threshold
        self._min_match_blocks = min_match_blocks
        self._rr = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> Any:
        hints = hints_of(pending_request)
        if hints is not None and (HINT_AVOID in hints or HINT_ONLY in hints):
            allowed = set(avoiding([r.replica_id.unique_id for r in candidate_replicas], hints))
            candidate_replicas = [r for r in candidate_replicas if r.replica_id.unique_id in allowed]
            if not candidate_replicas:
                # A probe of a replica that is gone: Ray retries, and it times out. Ray's
                # retry loop only sleeps (backs off) when told to; without this it would
                # spin without ever yielding the event loop.
                context = getattr(pending_request, "routing_context", None)
                if context is not None:
                    context.should_backoff = True
                return []
        # Ray's default first: it also sets the routing context (locality, backoff).
        fallback = await super().choose_replicas(
            candidate_replicas=candidate_replicas, pending_request=pending_request
        )
        if hints is not None and len(candidate_replicas) < len(self._replicas_list):
            # Ray's default picks from its own replica sets (locality), not the candidates.
            kept = {r.replica_id.unique_id for r in candidate_replicas}
            ranks = ([r for r in rank if r.replica_id.unique_id in kept] for rank in fallback)
            fallback = [rank for rank in ranks if rank]
            fallback = fallback or [candidate_replicas]
        if hints is None or not fallback or len(candidate_replicas) < 2:
            if hints is not None:
                hints[ROUTED_REASON] = "fallback"
            return fallback
        strategy = hints.get(HINT_STRATEGY)
        if strategy == "round_robin":
            ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            start = next(self._rr) % len(ordered)
            hints[ROUTED_REASON] = "round_robin"
            return [[ordered[(start + i) % len(ordered)]] for i in range(len(ordered))]
        if strategy != "prefix":
            hints[ROUTED_REASON] = "fallback"
            return fallback
        matched = parse_affinity(hints.get(HINT_AFFINITY))
        key_replica = hints.get(HINT_KEY_REPLICA) or None
        if not matched and key_replica is None:
            hints[ROUTED_REASON] = "fallback"
            return fallback
        loads = await self._loads(candidate_replicas)
        decision = decide(
            matched,
            key_replica,
            loads,
            imbalance_threshold=self._imbalance_threshold,
            min_match_blocks=self._min_match_blocks,
        )
        hints[ROUTED_REASON] = decision.reason
        if not decision.ranked:
            return fallback
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in decision.ranked if rid in by_id]

    async def _loads(self, replicas: list[Any]) -> dict[str, int]:
        """Ongoing requests of each replica that can take one more (cached, else probed)."""
        loads: dict[str, int] = {}
        missing = []
        for r in replicas:
            queue_len = (
                self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            )
            if queue_len is None or queue_len >= r.max_ongoing_requests:
                missing.append(r)
            else:
                loads[r.replica_id.unique_id] = int(queue_len)
        if missing:
            for r, queue_len in await self._probe_queue_lens(missing, 0):
                if queue_len is not None and queue_len < r.max_ongoing_requests:
                    loads[r.replica_id.unique_id] = int(queue_len)
        return loads

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        hints = hints_of(pending_request)
        if hints is not None:
            # The gateway passed this very dict; it reads the choice after the first item.
            hints[ROUTED_REPLICA] = replica_id.unique_id
