"""Prefix-affinity routing vs Ray Serve's default router vs round robin, on two real vLLM CPU replicas.

One run brings the oss-serving stack up (``oss-serve up --detach``) four times, one
configuration after the other, each with fresh engines (empty prefix caches), and sends
each the same workload:

1. ``single replica``: one engine with the KV cache of two: the hit-rate reference (every
   request meets every earlier prefix in one cache);
2. ``round robin``: two replicas, ``routing.strategy: round_robin``;
3. ``Ray default``: two replicas, ``power_of_two`` (Ray Serve's default request router);
4. ``oss-serving prefix``: two replicas, ``prefix`` (ours: the Redis prefix index and the
   engine deployment's request router, balanced with load).

Engines: SmolLM2-135M-Instruct on vLLM CPU, one OpenMP thread each (one core each on this
2-core machine), a KV cache of ``--kv-blocks`` blocks of 128 tokens per replica: room for
about five of the eight prefixes (with room for all of them on every replica, any router
reaches the same hit rate once warm, and routing would not matter).

Workload: ``--requests`` streamed chat requests from many users over 8 system prompts of
1,500 tokens (SmolLM2's tokenizer) and short questions (20-60 tokens), Poisson arrivals at
``--rate`` per second, ``--max-tokens`` output tokens. The arrival times, prefixes and
questions are the same for every configuration.

Hit rate: cached prompt tokens / prompt tokens, summed over the requests, from vLLM's own
per-request prefix-cache accounting (``usage.prompt_tokens_details.cached_tokens``: the
numbers its ``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` counters add up).
TTFT: request sent -> first content chunk, at the client.

    python bench/prefix_routing.py [--requests 240] [--rate 1.0] [--kv-blocks 72]

``bench/prefix_routing_sim.py`` runs the same comparison on the calibrated simulated engine
in virtual time (bigger fleets, longer runs). ``--calibrate PROFILE`` first fits that profile
in the fleet's own placement: the two-replica stack (Ray's default router, fresh engines)
with ``oss-loadtest calibrate``'s default design sent through the gateway, each request's
batch rebuilt from the replica the gateway names in ``x-oss-serving-replica``, so the
profile carries the gateway's cost per request and two engines sharing the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.local_stack import free_port, local_stack, percentile, progress_bar
from loadtest.sim.words import WORDS

MODEL = "smollm2-135m-instruct"
PREFIXES = 8
PREFIX_TOKENS = 1500


@dataclass(frozen=True)
class Job:
    at: float
    user: int
    prefix: int
    question: str


@dataclass
class Outcome:
    ttft_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str | None = None
    route: str | None = None
    error: str | None = None


@dataclass
class RunResult:
    name: str
    requests: int
    errors: int
    hit_rate: float
    ttft_p50_s: float
    ttft_p99_s: float
    replicas: dict[str, int] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)


def system_prompts(tokenizer: Any) -> list[str]:
    """Eight distinct system prompts of exactly PREFIX_TOKENS tokens each."""
    out = []
    for k in range(PREFIXES):
        rng = random.Random(1000 + k)
        text = f"Handbook {k} of the operations team. " + " ".join(rng.choice(WORDS) for _ in range(2400))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PREFIX_TOKENS]
        out.append(tokenizer.decode(ids))
    return out


def workload(n: int, rate: float, seed: int) -> list[Job]:
    rng = random.Random(seed)
    t = 0.0
    jobs = []
    for _ in range(n):
        t += rng.expovariate(rate)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        jobs.append(Job(at=t, user=rng.randrange(10_000), prefix=rng.randrange(PREFIXES), question=words))
    return jobs


async def one(client: httpx.AsyncClient, url: str, system: str, job: Job, max_tokens: int) -> Outcome:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"User {job.user} asks: {job.question}"},
        ],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = Outcome()
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}"
                return out
            out.replica = resp.headers.get("x-oss-serving-replica")
            out.route = resp.headers.get("x-oss-serving-route")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if out.ttft_s is None and choices and choices[0].get("delta", {}).get("content"):
                    out.ttft_s = time.perf_counter() - start
                usage = chunk.get("usage")
                if usage:
                    out.prompt_tokens = int(usage["prompt_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    out.cached_tokens = int(details.get("cached_tokens") or 0)
    except httpx.HTTPError as exc:
        out.error = type(exc).__name__
    return out


async def drive(
    name: str, url: str, jobs: list[Job], systems: list[str], max_tokens: int, progress: Progress
) -> RunResult:
    task = progress.add_task(f"{name:>20}", total=len(jobs))
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def at(job: Job) -> Outcome:
            await asyncio.sleep(max(0.0, start + job.at - time.perf_counter()))
            result = await one(client, url, systems[job.prefix], job, max_tokens)
            progress.advance(task)
            return result

        outcomes = await asyncio.gather(*(at(job) for job in jobs))
    ok = [o for o in outcomes if o.error is None and o.ttft_s is not None]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    replicas: dict[str, int] = {}
    routes: dict[str, int] = {}
    for o in ok:
        replicas[o.replica or "?"] = replicas.get(o.replica or "?", 0) + 1
        routes[o.route or "?"] = routes.get(o.route or "?", 0) + 1
    prompt = sum(o.prompt_tokens for o in ok)
    return RunResult(
        name=name,
        requests=len(jobs),
        errors=len(jobs) - len(ok),
        hit_rate=sum(o.cached_tokens for o in ok) / prompt if prompt else 0.0,
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p99_s=percentile(ttfts, 0.99),
        replicas=replicas,
        routes=routes,
    )


def stack_config(replicas: int, kv_blocks: int, strategy: str) -> dict[str, Any]:
    port = free_port()
    return {
        "models": [
            {
                "name": MODEL,
                "source": "builtin:smollm2-135m-instruct",
                "engine_kwargs": {
                    "max_model_len": 2048,
                    "dtype": "bfloat16",
                    "block_size": 128,
                    "num_gpu_blocks_override": kv_blocks,
                },
                # One OpenMP thread per engine: one core each.
                "engine_env": {
                    "VLLM_CPU_KVCACHE_SPACE": "1",
                    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "OMP_NUM_THREADS": "1",
                },
                "topology": {"min_replicas": replicas, "max_replicas": replicas},
            }
        ],
        "gateway": {"port": port},
        "auth": {"required": False},
        "queue": {"key_prefix": f"bench{port}"},
        "routing": {
            "strategy": strategy,
            "key_prefix": f"bench{port}:prefix",
            "decision_headers": True,
            # Blocks of 256 characters remembered per replica: about its KV cache.
            "replica_capacity_blocks": max(1, kv_blocks * 128 * 4 // 256),
        },
    }


def calibrate(args: argparse.Namespace, source: Path, work: Path, console: Console) -> None:
    """``oss-loadtest calibrate`` (the default design at ``--design-concurrency``) through the
    two-replica stack with fresh engines; the profile goes to ``args.calibrate``."""
    levels = [int(c) for c in args.design_concurrency.split(",")]
    console.rule(f"calibration: 2 replicas, {args.kv_blocks} KV blocks each, design concurrency {levels}")
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "calibrate.yaml"
    cfg.write_text(
        json.dumps(
            {
                "calibrate": {
                    "design": {"concurrency": levels},
                    "num_kv_blocks": args.kv_blocks,
                    "block_size": 128,
                    "max_num_seqs": 256,
                },
                "target": {"request_timeout_s": 600},
            }
        )
    )
    with local_stack(stack_config(2, args.kv_blocks, "power_of_two"), work / "stack") as url:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtest.cli",
                "calibrate",
                "--config",
                str(cfg),
                "--base-url",
                url,
                "--model",
                MODEL,
                "--tokenizer",
                f"hf:{source}",
                "--out",
                str(work / "run"),
                "--profile-out",
                str(args.calibrate),
            ],
            check=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second, both replicas")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=72, help="KV blocks (128 tokens) per replica")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run only these configurations (by name)")
    parser.add_argument("--out", type=Path, default=Path("results/prefix_routing.json"))
    parser.add_argument(
        "--calibrate",
        type=Path,
        metavar="PROFILE",
        help="first fit a profile through the two-replica stack (written here) with the default design",
    )
    parser.add_argument(
        "--design-concurrency",
        default="1,4,8,16",
        help="closed-loop levels of --calibrate's design (over both replicas)",
    )
    args = parser.parse_args()
    console = Console()

    from transformers import AutoTokenizer

    from serving.config import default_config
    from serving.engine.builder import resolve_source

    source, _ = resolve_source(default_config().models[0], default_config().local.cache_dir)
    systems = system_prompts(AutoTokenizer.from_pretrained(source))
    jobs = workload(args.requests, args.rate, args.seed)
    runs = [
        ("single replica", 1, 2 * args.kv_blocks, "prefix"),
        ("round robin", 2, args.kv_blocks, "round_robin"),
        ("Ray default (pow-2)", 2, args.kv_blocks, "power_of_two"),
        ("oss-serving prefix", 2, args.kv_blocks, "prefix"),
    ]
    if args.only:
        runs = [r for r in runs if r[0] in args.only]
    work = Path(tempfile.mkdtemp(prefix="oss-prefix-bench-"))
    if args.calibrate:
        calibrate(args, Path(source), work / "calibrate", console)
    results: list[RunResult] = []
    for i, (name, replicas, blocks, strategy) in enumerate(runs):
        console.rule(f"{name}: {replicas} replica(s), {blocks} KV blocks each, strategy {strategy}")
        with (
            local_stack(stack_config(replicas, blocks, strategy), work / str(i)) as url,
            progress_bar(console) as progress,
        ):
            results.append(asyncio.run(drive(name, url, jobs, systems, args.max_tokens, progress)))

    table = Table(
        title=(
            f"{args.requests} requests at {args.rate:g}/s over {PREFIXES} prefixes x {PREFIX_TOKENS} tokens, "
            f"{args.max_tokens} output tokens; SmolLM2 on vLLM CPU, one core per replica"
        )
    )
    for col in ("router", "hit rate", "TTFT p50 (s)", "TTFT p99 (s)", "errors", "requests per replica"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r.name,
            f"{r.hit_rate:.3f}",
            f"{r.ttft_p50_s:.3f}",
            f"{r.ttft_p99_s:.3f}",
            str(r.errors),
            " / ".join(str(n) for n in sorted(r.replicas.values(), reverse=True)),
        )
    console.print(table)
    by = {r.name: r for r in results}
    ours, single, rr = by.get("oss-serving prefix"), by.get("single replica"), by.get("round robin")
    summary: dict[str, float] = {}
    if ours and single:
        summary["hit_rate_vs_single"] = ours.hit_rate / single.hit_rate
        console.print(f"hit rate, ours / single replica: {summary['hit_rate_vs_single']:.3f} (target >= 0.9)")
    if ours and rr:
        summary["ttft_p50_vs_round_robin"] = ours.ttft_p50_s / rr.ttft_p50_s
        ratio = summary["ttft_p50_vs_round_robin"]
        console.print(f"TTFT p50, ours / round robin: {ratio:.3f} (target <= 0.6)")
    if ours:
        console.print(f"routing decisions (ours): {ours.routes}")
    if not results:  # --calibrate alone (--only none): keep the last measured run
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": [asdict(r) for r in results], "summary": summary}, indent=2))
    console.print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
