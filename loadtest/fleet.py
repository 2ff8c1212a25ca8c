"""Several simulated engine replicas behind one of the routing policies oss-serving ships.

A fleet is ``replicas`` copies of one :class:`~loadtest.sim.SimScheduler` (each with its
own KV cache and prefix cache) on one virtual clock, and a router that picks a replica
for every arriving request, as the engine deployment's request router does:

``round_robin``
    strict rotation (``routing.strategy: round_robin``, a baseline);
``power_of_two``
    Ray Serve's default: two distinct replicas drawn at random, the one with fewer
    ongoing requests wins (ties at random);
``prefix``
    ours: the longest indexed prompt prefix per replica, balanced with load by the same
    :func:`serving.engine.routing_hints.decide` the engine router applies, and Ray's
    default when nothing matched.

The prefix index is :class:`AffinityIndex`, an in-memory copy of the gateway's Redis
``PrefixIndex`` semantics: chained block hashes, per block the replicas it was sent to
with their last use, a per-replica LRU of ``index_capacity_blocks`` blocks, entries
older than ``index_ttl_s`` ignored. The simulator hashes token blocks of the engine's
block size where the gateway hashes 256-character text blocks of the rendered prompt:
the same prefixes match, at a different granularity.

Load is each replica's ongoing requests (routed and not finished), which is what the
engine router sees.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from loadtest.config import FleetConfig
from loadtest.sim import SimScheduler
from serving.engine.routing_hints import decide

__all__ = ["AffinityIndex", "FleetRouter", "ReplicaState"]


@dataclass
class ReplicaState:
    """One simulated replica: its scheduler, when its current step ends, its load."""

    name: str
    sched: SimScheduler
    busy_until: float | None = None
    ongoing: int = 0
    routed: int = 0


class AffinityIndex:
    """Which replica was last sent which prompt blocks (the gateway's prefix index, in memory)."""

    def __init__(self, capacity_blocks: int, ttl_s: float) -> None:
        self.capacity = capacity_blocks
        self.ttl = ttl_s
        self._blocks: dict[Hashable, dict[str, float]] = {}
        self._lru: dict[str, OrderedDict[Hashable, float]] = {}

    def lookup(self, hashes: Sequence[Hashable], now: float) -> dict[str, int]:
        """Leading blocks of ``hashes`` each replica holds (replicas with none left out)."""
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            here = {rid for rid, t in self._blocks.get(h, {}).items() if now - t <= self.ttl}
            alive = here if alive is None else alive & here
            if not alive:
                break
            for rid in alive:
                matched[rid] = i + 1
        return matched

    def record(self, replica: str, hashes: Sequence[Hashable], now: float) -> int:
        """Note that ``replica`` was sent these blocks; returns blocks dropped from its LRU."""
        lru = self._lru.setdefault(replica, OrderedDict())
        for h in hashes:
            self._blocks.setdefault(h, {})[replica] = now
            lru[h] = now
            lru.move_to_end(h)
        dropped = 0
        while len(lru) > self.capacity:
            h, _ = lru.popitem(last=False)
            holders = self._blocks.get(h)
            if holders is not None:
                holders.pop(replica, None)
                if not holders:
                    del self._blocks[h]
            dropped += 1
        return dropped


class FleetRouter:
    """Chooses a replica for each request under one routing policy."""

    def __init__(self, cfg: FleetConfig, capacity_blocks: int, seed: int = 0) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)
        self._rr = itertools.count()
        self.index = AffinityIndex(cfg.index_capacity_blocks or capacity_blocks, cfg.index_ttl_s)
        self.reasons: dict[str, int] = {}

    def _count(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _power_of_two(self, replicas: Sequence[ReplicaState]) -> int:
        a, b = self.rng.sample(range(len(replicas)), 2)
        la, lb = replicas[a].ongoing, replicas[b].ongoing
        if la == lb:
            return self.rng.choice((a, b))
        return a if la < lb else b

    def choose(self, replicas: Sequence[ReplicaState], hashes: Sequence[Hashable], now: float) -> int:
        """Index of the replica this request goes to (and the index updated for it)."""
        if len(replicas) == 1:
            return 0
        if self.cfg.routing == "round_robin":
            self._count("round_robin")
            return next(self._rr) % len(replicas)
        if self.cfg.routing == "power_of_two":
            self._count("fallback")
            return self._power_of_two(replicas)
        keyed = list(hashes[: self.cfg.max_blocks])
        loads = {r.name: r.ongoing for r in replicas}
        d = decide(
            self.index.lookup(keyed, now),
            None,
            loads,
            imbalance_threshold=self.cfg.imbalance_threshold,
            min_match_blocks=self.cfg.min_match_blocks,
        )
        self._count(d.reason)
        names = [r.name for r in replicas]
        chosen = names.index(d.ranked[0]) if d.ranked else self._power_of_two(replicas)
        self.index.record(names[chosen], keyed, now)
        return chosen
