"""Admission queue: throughput through the Lua path against redis-benchmark, and added latency.

In one run, against one private redis-server on a free loopback port:

1. ``redis-benchmark`` (SET, GET and EVALSHA of a trivial script, 50 clients) gives the
   server's ceiling for single commands on this machine;
2. admission throughput: W worker processes, each with C concurrent clients, each looping
   ``acquire`` (the enqueue script, granted at once) then ``release`` (the release script)
   with free capacity; an admission costs two scripts, so the script rate is twice the
   admission rate;
3. the latency the queue adds to a request when capacity is free: one client at a time,
   ``acquire`` + ``release`` timed around each request (p50 / p99).

    python bench/queue_admission.py --seconds 5 --workers 2 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.config import QueueConfig
from serving.gateway.admission import Admission
from serving.gateway.tenants import Tenant
from tests.redis_server import RedisServer


def redis_benchmark(port: int, requests: int) -> dict[str, float]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {}
    out = subprocess.run(
        [binary, "-p", str(port), "-n", str(requests), "-c", "50", "-t", "set,get", "--csv", "-q"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    ceilings = {row[0]: float(row[1]) for row in list(csv.reader(out.splitlines()))[1:]}
    script = subprocess.run(
        [binary, "-p", str(port), "-n", str(requests), "-c", "50", "--csv", "-q",
         "eval", "return redis.call('incr', KEYS[1])", "1", "bench:k"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for row in list(csv.reader(script.splitlines()))[1:]:
        ceilings["EVAL (one INCR)"] = float(row[1])
    return ceilings


async def _admit_loop(url: str, clients: int, seconds: float, model: str) -> int:
    client = aioredis.Redis.from_url(url, max_connections=clients + 4)
    admission = Admission(client, QueueConfig(default_capacity=1_000_000), [model])
    tenant = Tenant(id="bench")
    deadline = time.monotonic() + seconds
    count = 0

    async def one() -> None:
        nonlocal count
        while time.monotonic() < deadline:
            lease = await admission.acquire(model, tenant, None)
            await admission.release(lease)
            count += 1

    await asyncio.gather(*(one() for _ in range(clients)))
    await admission.stop()
    await client.aclose()
    return count


def _worker(url: str, clients: int, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_admit_loop(url, clients, seconds, "bench")))


def admission_throughput(url: str, workers: int, clients: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_worker, args=(url, clients, seconds, results)) for _ in range(workers)]
    started = time.monotonic()
    for p in procs:
        p.start()
    total = sum(results.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / max(time.monotonic() - started - 1.0, seconds)  # ~1 s of process start-up


async def added_latency(url: str, n: int) -> tuple[float, float, float]:
    client = aioredis.Redis.from_url(url)
    admission = Admission(client, QueueConfig(default_capacity=64), ["lat"])
    tenant = Tenant(id="bench")
    samples = []
    for _ in range(200):  # warm-up: scripts loaded, connections open
        await admission.release(await admission.acquire("lat", tenant, None))
    for _ in range(n):
        t0 = time.perf_counter()
        lease = await admission.acquire("lat", tenant, None)
        t1 = time.perf_counter()
        await admission.release(lease)
        t2 = time.perf_counter()
        samples.append(((t1 - t0) * 1000, (t2 - t0) * 1000))
    await admission.stop()
    await client.aclose()
    acquire = sorted(s[0] for s in samples)
    total = sorted(s[1] for s in samples)
    return acquire[len(acquire) // 2], total[len(total) // 2], total[int(len(total) * 0.99)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("results/queue_admission.json"))
    args = parser.parse_args()
    console = Console()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="oss-queue-bench-"))).start()
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("redis-benchmark ceiling", total=3)
            ceilings = redis_benchmark(server.port, 100_000)
            progress.update(task, advance=1, description="admission throughput (Lua path)")
            rate = admission_throughput(server.url, args.workers, args.clients, args.seconds)
            progress.update(task, advance=1, description="added latency at light load")
            acquire_p50, total_p50, total_p99 = asyncio.run(added_latency(server.url, args.latency_samples))
            progress.update(task, advance=1)
    finally:
        server.stop()

    table = Table(title="admission queue on one Redis (this machine)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("vs redis-benchmark", justify="right")
    ceiling = ceilings.get("EVAL (one INCR)") or ceilings.get("SET") or 0.0
    for name, value in ceilings.items():
        table.add_row(f"redis-benchmark {name} (ops/s, 50 clients)", f"{value:,.0f}", "")
    table.add_row(
        f"admissions/s ({args.workers} processes x {args.clients} clients; 2 scripts each)",
        f"{rate:,.0f}",
        f"{2 * rate / ceiling:.2f} of EVAL ceiling (scripts)" if ceiling else "",
    )
    table.add_row("added latency p50, acquire only (ms)", f"{acquire_p50:.3f}", "")
    table.add_row("added latency p50, acquire + release (ms)", f"{total_p50:.3f}", "")
    table.add_row("added latency p99, acquire + release (ms)", f"{total_p99:.3f}", "")
    console.print(table)
    console.print("targets: p50 added latency < 1 ms at light load; >= 5,000 admissions/s per Redis")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "redis_benchmark_ops_per_s": ceilings,
                "admissions_per_s": rate,
                "added_latency_ms": {
                    "acquire_p50": acquire_p50,
                    "total_p50": total_p50,
                    "total_p99": total_p99,
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
