"""Prefix-affinity routing vs Ray Serve's default router vs round robin, on two engine replicas.

Engines: the calibrated simulated engine (``loadtest.sim``: vLLM's continuous
batching, block-level prefix cache with LRU eviction, prefill cost per uncached token),
two replicas driven in virtual time, plus one replica alone as the hit-rate reference.
Two real vLLM CPU replicas could not be run next to each other on this shared 2-core
machine within the time of one benchmark run, so this is the simulation the issue
allows; the engine profile below is SmolLM2-135M on one CPU core (prefill and decode
costs) with a KV cache that holds about five of the eight shared prefixes per replica
(the regime where routing matters: with room for every prefix on every replica, any
router reaches the same hit rate after warm-up).

Our routing runs the real code: ``render_prompt`` and ``block_hashes`` of the gateway,
the Redis ``PrefixIndex`` (at ``--redis``, own key prefix, virtual time as ``now``) and
the same ``decide`` rule the engine deployment's router applies, with each replica's
ongoing requests as load. Ray's default: power of two choices on ongoing requests.

Workload: many users over 8 system prompts of 1,500 tokens, short questions (20-60
tokens), 32 output tokens, Poisson arrivals. Prints hit rate (from the engines' own
prefix-cache counters: hit tokens / queried tokens) and TTFT p50/p99, with the ratios
the issue targets.

    python bench/prefix_routing_sim.py [--requests 1200] [--rate 2.0] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import random
import statistics
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from loadtest.sim import EngineProfile, SimRequest, SimScheduler, block_hashes
from serving.config import RoutingConfig
from serving.engine.protocol import Endpoint
from serving.engine.routing_hints import decide
from serving.gateway.prefix import PrefixIndex, render_prompt
from serving.gateway.prefix import block_hashes as text_block_hashes

PREFIXES = 8
PREFIX_TOKENS = 1500
OUTPUT_TOKENS = 32
CHARS_PER_TOKEN = 4

# SmolLM2-135M on one CPU core (vLLM CPU): about 0.35 ms per prompt token of prefill,
# 12 ms per decode step plus 0.5 ms per running sequence; KV room for ~5 prefixes.
PROFILE = EngineProfile(
    name="smollm2-135m-cpu-1core",
    step_base_s=0.012,
    step_per_seq_s=0.0005,
    prefill_per_token_s=0.00035,
    block_size=16,
    num_kv_blocks=520,
    max_num_seqs=32,
    max_num_batched_tokens=2048,
)


@dataclass
class Req:
    rid: int
    arrival: float
    prefix: int
    question_tokens: int
    token_ids: list[int]
    text_body: dict[str, object]
    replica: int = -1
    ttft: float | None = None


@dataclass
class Replica:
    sched: SimScheduler
    busy_until: float | None = None
    ongoing: int = 0
    reqs: dict[str, Req] = field(default_factory=dict)


def workload(n: int, rate: float, seed: int) -> list[Req]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        k = rng.randrange(PREFIXES)
        q = rng.randint(20, 60)
        prefix_ids = [k * 1_000_000 + j for j in range(PREFIX_TOKENS)]
        question_ids = [rng.randrange(10**9) + 10**8 for _ in range(q)]
        system = (f"[policy {k}] " + "Our rules for this team are these. " * 200)[
            : PREFIX_TOKENS * CHARS_PER_TOKEN
        ]
        body = {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"question {i} " + "x" * (q * CHARS_PER_TOKEN)},
            ]
        }
        out.append(Req(i, t, k, q, prefix_ids + question_ids, body))
    return out


class Router:
    def __init__(self, kind: str, n: int, index: PrefixIndex | None, cfg: RoutingConfig, seed: int) -> None:
        self.kind, self.n, self.index, self.cfg = kind, n, index, cfg
        self.rng = random.Random(seed)
        self.rr = itertools.count()
        self.reasons: dict[str, int] = {}

    async def choose(self, req: Req, replicas: list[Replica], now: float) -> int:
        if self.n == 1:
            return 0
        loads = {f"r{i}": r.ongoing for i, r in enumerate(replicas)}
        if self.kind == "round_robin":
            return next(self.rr) % self.n
        if self.kind == "power_of_two":
            a, b = self.rng.sample(range(self.n), 2)
            if replicas[a].ongoing == replicas[b].ongoing:
                return self.rng.choice((a, b))
            return a if replicas[a].ongoing < replicas[b].ongoing else b
        assert self.index is not None
        hashes = text_block_hashes(
            render_prompt(Endpoint.chat, req.text_body), self.cfg.block_chars, self.cfg.max_blocks
        )
        found = await self.index.lookup("bench", hashes, None, now=now)
        d = decide(found.matched, None, loads, imbalance_threshold=self.cfg.imbalance_threshold)
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        if d.ranked:
            chosen = int(d.ranked[0][1:])
        else:  # no affinity: Ray's default (power of two choices on load)
            a, b = self.rng.sample(range(self.n), 2)
            chosen = (
                a
                if (replicas[a].ongoing, self.rng.random()) < (replicas[b].ongoing, self.rng.random())
                else b
            )
        await self.index.record("bench", f"r{chosen}", hashes, None, now=now)
        return chosen


async def run(
    kind: str, n_replicas: int, reqs: list[Req], index: PrefixIndex | None, cfg: RoutingConfig, seed: int
) -> dict[str, float]:
    replicas = [Replica(SimScheduler(PROFILE)) for _ in range(n_replicas)]
    router = Router(kind, n_replicas, index, cfg, seed)
    events: list[tuple[float, int, str, int]] = []  # (time, order, kind, index)
    order = itertools.count()
    for i, r in enumerate(reqs):
        heapq.heappush(events, (r.arrival, next(order), "arrive", i))
    by_sim: dict[str, Req] = {}

    def start_step(i: int, now: float) -> None:
        rep = replicas[i]
        out = rep.sched.step(now)
        end = now + out.duration
        rep.busy_until = end
        heapq.heappush(events, (end, next(order), "step", i))
        rep.pending_out = out  # type: ignore[attr-defined]

    while events:
        now, _, what, i = heapq.heappop(events)
        if what == "arrive":
            req = reqs[i]
            j = await router.choose(req, replicas, now)
            req.replica = j
            sim = SimRequest(
                rid=str(req.rid),
                prompt_len=len(req.token_ids),
                max_tokens=OUTPUT_TOKENS,
                hashes=block_hashes(req.token_ids, PROFILE.block_size),
                arrival=now,
            )
            by_sim[sim.rid] = req
            rep = replicas[j]
            rep.ongoing += 1
            rep.sched.add(sim)
            if rep.busy_until is None:
                start_step(j, now)
        else:
            rep = replicas[i]
            out = rep.pending_out  # type: ignore[attr-defined]
            for sim in out.tokens:
                req = by_sim[sim.rid]
                if req.ttft is None:
                    req.ttft = now - req.arrival
            rep.ongoing -= len(out.finished)
            rep.busy_until = None
            if rep.sched.has_work:
                start_step(i, now)
    queries = sum(r.sched.prefix_queries for r in replicas)
    hits = sum(r.sched.prefix_hits for r in replicas)
    ttfts = sorted(r.ttft for r in reqs if r.ttft is not None)
    return {
        "hit_rate": hits / queries if queries else 0.0,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[int(0.99 * (len(ttfts) - 1))],
        "reasons": router.reasons,  # type: ignore[dict-item]
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (both replicas)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    redis = aioredis.Redis.from_url(args.redis)
    prefix = f"bench-prefix-{uuid.uuid4().hex[:8]}"
    cfg = RoutingConfig(
        key_prefix=prefix, replica_capacity_blocks=PROFILE.num_kv_blocks * 16 * CHARS_PER_TOKEN // 256
    )
    reqs = workload(args.requests, args.rate, args.seed)
    results = {}
    try:
        for name, kind, n in (
            ("single replica", "single", 1),
            ("round robin", "round_robin", 2),
            ("Ray default (pow-2)", "power_of_two", 2),
            ("oss-serving prefix", "prefix", 2),
        ):
            fresh = [
                Req(r.rid, r.arrival, r.prefix, r.question_tokens, r.token_ids, r.text_body) for r in reqs
            ]
            index = PrefixIndex(redis, cfg) if kind == "prefix" else None
            results[name] = await run(kind, n, fresh, index, cfg, args.seed)
    finally:
        keys = [k async for k in redis.scan_iter(match="{" + prefix + "*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    print(
        f"engine: simulated ({PROFILE.name}), {args.requests} requests at {args.rate:g}/s, "
        f"{PREFIXES} prefixes x {PREFIX_TOKENS} tokens, {OUTPUT_TOKENS} output tokens"
    )
    print("| router | prefix-cache hit rate | TTFT p50 (s) | TTFT p99 (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['hit_rate']:.3f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} |")
    ours, single, rr = results["oss-serving prefix"], results["single replica"], results["round robin"]
    print(f"hit rate ours / single replica: {ours['hit_rate'] / single['hit_rate']:.3f} (target >= 0.9)")
    print(f"TTFT p50 ours / round robin: {ours['ttft_p50'] / rr['ttft_p50']:.3f} (target <= 0.6)")
    print(f"routing decisions (ours): {ours['reasons']}")


if __name__ == "__main__":
    asyncio.run(main())
