"""The simulated engine's scheduler: continuous batching over a KV block pool.

Pure Python with no clock: :meth:`SimScheduler.step` plans one engine step and returns
how long it takes, which tokens it produced and which requests finished. The HTTP
server sleeps for that long (real time); ``loadtest.simulate`` advances a virtual clock.

Per step, like vLLM's scheduler (FCFS, recompute preemption):

1. every running sequence that needs a new KV block gets one; when none is free, the
   most recently admitted sequence is preempted (blocks freed, back to the front of the
   waiting queue, its prompt and generated tokens recomputed on resume);
2. waiting requests are admitted in order while fewer than ``max_num_seqs`` run, the
   step's prompt-token budget lasts and their blocks fit (prefix-cache hits are reused);
3. admitted requests are prefilled and emit their first token; the others decode one
   token each.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from loadtest.sim.profile import EngineProfile, prefill_pairs_of

__all__ = ["BlockManager", "SimRequest", "SimScheduler", "StepOutput", "block_hashes"]


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a block's hash covers its prefix)."""
    out: list[int] = []
    prev = 0
    for i in range(len(token_ids) // block_size):
        prev = hash((prev, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        out.append(prev)
    return out


class BlockManager:
    """A pool of KV blocks with a prefix cache of freed full blocks (LRU eviction)."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._ref: dict[Hashable, int] = {}
        self._evictable: OrderedDict[Hashable, None] = OrderedDict()
        self._ids = itertools.count()
        self.repeated = 0
        """References to held blocks beyond each block's first holder (prefix-cache blocks
        that several running sequences share)."""

    @property
    def used(self) -> int:
        """Blocks held by running sequences."""
        return len(self._ref)

    @property
    def available(self) -> int:
        """Blocks that can be allocated (free or evictable)."""
        return self.num_blocks - len(self._ref)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are in the cache."""
        if not self.caching:
            return 0
        n = 0
        for h in hashes:
            if h not in self._ref and h not in self._evictable:
                break
            n += 1
        return n

    def allocate(self, hashes: Sequence[int], n_blocks: int) -> tuple[list[Hashable], int] | None:
        """Blocks for a sequence needing ``n_blocks`` whose full prompt blocks hash to
        ``hashes``; returns (block keys, cached blocks) or None when they do not fit."""
        hits = min(self.cached_prefix(hashes), n_blocks)
        hit_evictable = sum(1 for h in hashes[:hits] if h in self._evictable)
        if n_blocks - hits > self.available - hit_evictable:
            return None
        keys: list[Hashable] = []
        for h in hashes[:hits]:
            self._evictable.pop(h, None)
            self._hold(h)
            keys.append(h)
        for i in range(hits, n_blocks):
            key: Hashable = hashes[i] if self.caching and i < len(hashes) else ("u", next(self._ids))
            self._take(key)
            keys.append(key)
        return keys, hits

    def append(self) -> Hashable | None:
        """One more (unshared) block, or None when none is available."""
        if self.available <= 0:
            return None
        key = ("u", next(self._ids))
        self._take(key)
        return key

    def _take(self, key: Hashable) -> None:
        if self.num_blocks - len(self._ref) - len(self._evictable) <= 0:
            self._evictable.popitem(last=False)
        self._hold(key)

    def _hold(self, key: Hashable) -> None:
        n = self._ref.get(key, 0)
        self._ref[key] = n + 1
        if n:
            self.repeated += 1

    def free(self, keys: Sequence[Hashable]) -> None:
        """Release a sequence's blocks; full prompt blocks stay cached until evicted."""
        for key in reversed(keys):
            n = self._ref[key] - 1
            if n:
                self._ref[key] = n
                self.repeated -= 1
                continue
            del self._ref[key]
            if self.caching and not (isinstance(key, tuple) and key[:1] == ("u",)):
                self._evictable[key] = None


@dataclass(eq=False)
class SimRequest:
    """One request inside the simulated engine."""

    rid: str
    prompt_len: int
    max_tokens: int
    hashes: list[int] = field(default_factory=list)
    arrival: float = 0.0
    generated: int = 0
    cached_tokens: int = 0
    blocks: list[Hashable] = field(default_factory=list)
    prefilled: bool = False
    preemptions: int = 0
    first_scheduled: float | None = None

    @property
    def context_len(self) -> int:
        """Tokens the sequence holds (prompt plus generated)."""
        return self.prompt_len + self.generated

    @property
    def done(self) -> bool:
        return self.generated >= self.max_tokens


@dataclass
class StepOutput:
    """What one engine step did."""

    duration: float
    tokens: list[SimRequest]
    """Requests that emitted one token in this step (their ``generated`` already counts it)."""
    finished: list[SimRequest]
    admitted: list[SimRequest]
    preempted: list[SimRequest]
    prefill_tokens: int
    running: int
    kv_tokens: int


class SimScheduler:
    """Continuous batching with the timing of an :class:`EngineProfile`."""

    def __init__(self, profile: EngineProfile) -> None:
        self.profile = profile
        self.blocks = BlockManager(profile.num_kv_blocks, profile.block_size, profile.enable_prefix_caching)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0

    def add(self, req: SimRequest) -> None:
        """Queue a request."""
        self.waiting.append(req)

    def abort(self, req: SimRequest) -> None:
        """Drop a request (client went away)."""
        if req in self.running:
            self.running.remove(req)
            self.blocks.free(req.blocks)
            req.blocks = []
        elif req in self.waiting:
            self.waiting.remove(req)

    def fits_ever(self, req: SimRequest) -> bool:
        """Whether the request could run on an empty engine."""
        need = -(-(req.prompt_len + req.max_tokens) // self.profile.block_size)
        return need <= self.profile.num_kv_blocks

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by running sequences."""
        return self.blocks.used / self.profile.num_kv_blocks

    def _blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.profile.block_size)

    def step(self, now: float = 0.0) -> StepOutput:
        """Plan and account one engine step (``now`` only stamps first scheduling)."""
        p = self.profile
        preempted: list[SimRequest] = []
        # 1. room for the next token of every decoding sequence
        for req in list(self.running):
            if req not in self.running or not req.prefilled:
                continue
            if self._blocks_needed(req.context_len + 1) > len(req.blocks):
                while True:
                    key = self.blocks.append()
                    if key is not None:
                        req.blocks.append(key)
                        break
                    victim = self.running[-1]
                    self.running.remove(victim)
                    self.blocks.free(victim.blocks)
                    victim.blocks = []
                    victim.prefilled = False
                    victim.preemptions += 1
                    self.preemptions += 1
                    preempted.append(victim)
                    self.waiting.appendleft(victim)
                    if victim is req:
                        break
        # 2. admission
        admitted: list[SimRequest] = []
        budget = p.max_num_batched_tokens
        prefill_tokens = 0
        prefill_pairs = 0.0
        while self.waiting and len(self.running) < p.max_num_seqs:
            req = self.waiting[0]
            length = req.context_len
            hashes = req.hashes if req.generated == 0 else req.hashes[: req.prompt_len // p.block_size]
            cached = min(self.blocks.cached_prefix(hashes) * p.block_size, max(0, length - 1))
            new_tokens = length - cached
            if admitted and new_tokens > budget:
                break
            alloc = self.blocks.allocate(hashes, self._blocks_needed(length + 1))
            if alloc is None:
                break
            self.waiting.popleft()
            req.blocks, hit_blocks = alloc
            cached = min(hit_blocks * p.block_size, max(0, length - 1))
            if req.generated == 0 and req.preemptions == 0:
                req.cached_tokens = cached
                self.prefix_queries += req.prompt_len
                self.prefix_hits += cached
            if req.first_scheduled is None:
                req.first_scheduled = now
            prefill_tokens += length - cached
            prefill_pairs += prefill_pairs_of(length - cached, cached)
            budget -= length - cached
            self.running.append(req)
            admitted.append(req)
        # 3. compute
        decoding = [r for r in self.running if r.prefilled]
        kv_tokens = sum(r.context_len for r in self.running)
        # a block several running sequences share is read for each of them; after the first
        # read it may come from the cache (shared_kv_weight < 1)
        kv_charged = kv_tokens - (1.0 - p.shared_kv_weight) * self.blocks.repeated * p.block_size
        n_running = len(self.running)
        duration = 0.0
        if n_running:
            duration = (
                p.step_base_s
                + p.step_per_seq_s * n_running
                + p.step_per_kv_token_s * kv_charged
                + p.prefill_per_token_s * prefill_tokens
                + p.prefill_attention_s * prefill_pairs
            )
        emitted = decoding + admitted
        finished: list[SimRequest] = []
        for req in emitted:
            req.prefilled = True
            req.generated += 1
            if req.done:
                finished.append(req)
        for req in finished:
            self.running.remove(req)
            self.blocks.free(req.blocks)
            req.blocks = []
        return StepOutput(
            duration=duration,
            tokens=emitted,
            finished=finished,
            admitted=admitted,
            preempted=preempted,
            prefill_tokens=prefill_tokens,
            running=n_running,
            kv_tokens=kv_tokens,
        )
