"""Run one load: send on schedule, record, check the run's own validity.

Open loop: request *i* is due at ``t0 + offset[i]`` whatever the server does; it is
sent from its own task, so a slow response never delays the next send. The send lag
(actual minus scheduled send) is measured for every request and every latency counts
from the scheduled time. Closed loop (``concurrency``): *c* clients each send their next
request when their previous one ends; there the "schedule" is the moment a client
becomes free.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from loadtest.arrivals import schedule
from loadtest.client import OpenAIClient, assign_chunk_tokens
from loadtest.config import LoadTestConfig
from loadtest.records import ErrorKind, RequestRecord
from loadtest.scrape import Sample, Scraper
from loadtest.tokenizer import Tokenizer, load_tokenizer
from loadtest.workload import PlannedRequest, build_requests

__all__ = ["RawRun", "Validity", "check_validity", "execute", "plan_run", "run_coroutine", "run_load"]

Progress = Callable[[int, int], None]
"""Called with (sent, finished) counts."""


@dataclass(slots=True)
class Validity:
    """The run's own checks (see :func:`check_validity`)."""

    valid: bool
    reasons: list[str]
    warnings: list[str]
    target_rate: float | None
    scheduled_rate: float | None
    achieved_rate: float | None
    send_lag_p99_s: float | None
    send_lag_max_s: float | None
    client_cpu: float
    system_cpu: float

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass
class RawRun:
    """Records, scraped samples and validity of one run."""

    records: list[RequestRecord]
    samples: list[Sample]
    validity: Validity
    started_at: float
    wall_s: float
    mode: str
    target_rate: float | None
    meta: dict[str, object] = field(default_factory=dict)


def _rate(times: list[float]) -> float | None:
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else None


def check_validity(
    records: list[RequestRecord],
    target_rate: float | None,
    client_cpu: float,
    system_cpu: float,
    cfg: LoadTestConfig,
) -> Validity:
    """Invalid when the achieved send rate is under ``min_rate_ratio`` of the scheduled
    rate, or the p99 send lag is over ``max_send_lag_p99_s``. The scheduled rate is the
    drawn schedule's own rate, so Poisson sampling noise is not blamed on the generator;
    it is reported next to the target rate."""
    v = cfg.validity
    lags = [r.sent - r.scheduled for r in records if r.sent is not None]
    never_sent = sum(1 for r in records if r.sent is None)
    p99 = float(np.percentile(lags, 99)) if lags else None
    scheduled_rate = _rate([r.scheduled for r in records]) if target_rate else None
    achieved_rate = _rate([r.sent for r in records if r.sent is not None]) if target_rate else None
    reasons: list[str] = []
    warnings: list[str] = []
    if never_sent:
        reasons.append(f"{never_sent} scheduled requests were never sent")
    if scheduled_rate and achieved_rate is not None and achieved_rate < v.min_rate_ratio * scheduled_rate:
        reasons.append(
            f"achieved send rate {achieved_rate:.3g}/s is under {v.min_rate_ratio:.0%} "
            f"of the scheduled {scheduled_rate:.3g}/s"
        )
    if p99 is not None and p99 > v.max_send_lag_p99_s:
        reasons.append(f"p99 send lag {p99 * 1e3:.1f} ms is over {v.max_send_lag_p99_s * 1e3:.0f} ms")
    if client_cpu > v.max_client_cpu:
        warnings.append(f"client CPU {client_cpu:.0%} of a core: the generator may be the bottleneck")
    return Validity(
        valid=not reasons,
        reasons=reasons,
        warnings=warnings,
        target_rate=target_rate,
        scheduled_rate=scheduled_rate,
        achieved_rate=achieved_rate,
        send_lag_p99_s=p99,
        send_lag_max_s=max(lags) if lags else None,
        client_cpu=client_cpu,
        system_cpu=system_cpu,
    )


def plan_run(
    cfg: LoadTestConfig, tokenizer: Tokenizer | None = None
) -> tuple[list[PlannedRequest], list[float]]:
    """The requests and (open loop) their send offsets."""
    tok = tokenizer or load_tokenizer(cfg.metrics.tokenizer)
    ld = cfg.load
    if cfg.workload.trace is not None:
        reqs = build_requests(cfg.workload, ld.num_requests, tok, cfg.target.model)
        reqs = [r for r in reqs if r.offset is not None and r.offset < ld.max_duration_s]
        return reqs, [r.offset or 0.0 for r in reqs]
    if ld.arrival == "concurrency":
        return build_requests(cfg.workload, ld.num_requests, tok, cfg.target.model), []
    offsets = schedule(
        ld.arrival,
        ld.rate,
        ld.num_requests,
        burstiness=ld.burstiness,
        max_duration_s=ld.max_duration_s,
        seed=ld.seed,
    )
    reqs = build_requests(cfg.workload, len(offsets), tok, cfg.target.model)
    return reqs, offsets


def _record(req: PlannedRequest, scheduled: float) -> RequestRecord:
    return RequestRecord(
        index=req.index,
        scheduled=scheduled,
        stream=req.stream,
        requested_input_tokens=req.input_tokens,
        requested_output_tokens=req.output_tokens,
        tags=dict(req.tags),
    )


async def _open_loop(
    client: OpenAIClient,
    reqs: list[PlannedRequest],
    offsets: list[float],
    t0: float,
    drain_timeout_s: float,
    progress: Progress | None,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    finished = 0

    def done(_: asyncio.Task[None]) -> None:
        nonlocal finished
        finished += 1
        if progress:
            progress(len(tasks), finished)

    clock = time.perf_counter
    for req, off in zip(reqs, offsets, strict=True):
        delay = t0 + off - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = _record(req, off)
        records.append(rec)
        task = asyncio.create_task(client.send(req, rec, t0))
        task.add_done_callback(done)
        tasks.append(task)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records


async def _closed_loop(
    client: OpenAIClient,
    reqs: list[PlannedRequest],
    concurrency: int,
    t0: float,
    max_duration_s: float,
    progress: Progress | None,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    it = iter(reqs)
    clock = time.perf_counter
    finished = 0

    async def worker() -> None:
        nonlocal finished
        for req in it:
            now = clock() - t0
            if now >= max_duration_s:
                return
            rec = _record(req, now)
            records.append(rec)
            await client.send(req, rec, t0)
            finished += 1
            if progress:
                progress(len(records), finished)

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(workers, timeout=max_duration_s + client_timeout_margin(max_duration_s))
    for w in pending:
        w.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for r in records:
        if r.end is None:
            r.error = r.error or ErrorKind.CANCELLED
    return records


def client_timeout_margin(max_duration_s: float) -> float:
    """Extra time a closed loop waits for its last requests."""
    return max(30.0, 0.5 * max_duration_s)


async def execute(
    cfg: LoadTestConfig,
    reqs: list[PlannedRequest],
    offsets: list[float],
    tokenizer: Tokenizer | None = None,
    progress: Progress | None = None,
) -> RawRun:
    """Send ``reqs`` (on ``offsets``, or as a closed loop when empty and the arrival is
    ``concurrency``) while scraping the configured endpoints."""
    closed = cfg.load.arrival == "concurrency" and cfg.workload.trace is None
    target_rate = None if closed else (cfg.load.rate if cfg.workload.trace is None else None)
    proc = psutil.Process()
    stop = asyncio.Event()
    async with OpenAIClient(cfg.target.base_url, cfg.target.api_key, cfg.target.request_timeout_s) as client:
        for req in reqs:  # encode every body now, off the schedule
            client.prepare(req)
        # what exists now lives for the whole run: keep the cyclic collector off it
        gc.collect()
        gc.freeze()
        psutil.cpu_percent(None)
        cpu0 = proc.cpu_times()
        started_at = time.time()
        t0 = time.perf_counter() + 0.05
        scraper = Scraper(cfg.scrape.urls, cfg.scrape.interval_s, cfg.scrape.prefixes, t0)
        scrape_task = asyncio.create_task(scraper.run(stop))
        try:
            if closed:
                records = await _closed_loop(
                    client, reqs, cfg.load.concurrency, t0, cfg.load.max_duration_s, progress
                )
            else:
                records = await _open_loop(client, reqs, offsets, t0, cfg.load.drain_timeout_s, progress)
        finally:
            gc.unfreeze()
            stop.set()
            with contextlib.suppress(Exception):
                await scrape_task
    wall = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    client_cpu = ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall if wall > 0 else 0.0
    system_cpu = psutil.cpu_percent(None) / 100.0
    assign_chunk_tokens(records, tokenizer)
    validity = check_validity(records, target_rate, client_cpu, system_cpu, cfg)
    return RawRun(
        records=records,
        samples=scraper.samples,
        validity=validity,
        started_at=started_at,
        wall_s=wall,
        mode="concurrency" if closed else ("trace" if cfg.workload.trace else cfg.load.arrival),
        target_rate=target_rate,
        meta={"scrape_errors": scraper.errors},
    )


def run_load(cfg: LoadTestConfig, progress: Progress | None = None) -> RawRun:
    """Plan and execute one run (blocking; starts its own event loop)."""
    tok = load_tokenizer(cfg.metrics.tokenizer)
    reqs, offsets = plan_run(cfg, tok)
    return run_coroutine(cfg, execute(cfg, reqs, offsets, tok, progress))


def run_coroutine(cfg: LoadTestConfig, coro: Coroutine[Any, Any, RawRun]) -> RawRun:
    """Run ``coro`` on a new event loop of the configured kind (``uvloop`` when asked and
    installed: less CPU per request, so the schedule holds at higher rates)."""
    if cfg.load.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError as exc:
            coro.close()
            raise RuntimeError("load.event_loop is uvloop but uvloop is not installed") from exc
        return uvloop.run(coro)
    return asyncio.run(coro)
