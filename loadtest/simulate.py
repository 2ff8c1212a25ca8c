"""Run a workload against the simulated engine in virtual time (no HTTP, no sleeping).

The same :class:`~loadtest.sim.SimScheduler` that times the simulated HTTP
engine is stepped here on a virtual clock, so a sweep or an SLO search over thousands
of requests takes seconds. It produces ordinary :class:`RequestRecord` s (send lag 0),
scored by the same metric code as live runs. This is what ``plan --profile`` and the
calibration check use.
"""

from __future__ import annotations

import heapq
import time

from loadtest.config import LoadTestConfig
from loadtest.records import Chunk, ErrorKind, RequestRecord
from loadtest.runner import RawRun, Validity, plan_run
from loadtest.sim import EngineProfile, SimRequest, SimScheduler, block_hashes
from loadtest.sim.server import prompt_text
from loadtest.tokenizer import Tokenizer, load_tokenizer
from loadtest.workload import PlannedRequest

__all__ = ["simulate_records", "simulate_run"]


def _sim_request(
    req: PlannedRequest, profile: EngineProfile, tokenizer: Tokenizer, arrival: float
) -> tuple[SimRequest, int]:
    chat = req.path.endswith("chat/completions")
    ids = tokenizer.encode(prompt_text(req.body, chat))
    prompt_len = len(ids) + (profile.chat_template_tokens if chat else 0)
    max_tokens = int(req.body.get("max_tokens") or profile.default_max_tokens)
    effort = req.body.get("reasoning_effort")
    n_reason = round(max_tokens * profile.reasoning_fraction.get(str(effort), 0.0)) if effort else 0
    sim = SimRequest(
        rid=str(req.index),
        prompt_len=max(1, prompt_len),
        max_tokens=max_tokens,
        hashes=block_hashes(ids, profile.block_size),
        arrival=arrival,
    )
    return sim, n_reason


def simulate_records(
    profile: EngineProfile,
    reqs: list[PlannedRequest],
    offsets: list[float] | None,
    tokenizer: Tokenizer,
    *,
    concurrency: int | None = None,
    request_timeout_s: float = 600.0,
    drain_timeout_s: float = 120.0,
    max_duration_s: float = 3600.0,
) -> list[RequestRecord]:
    """Records of ``reqs`` sent on ``offsets`` (open loop) or by ``concurrency`` clients."""
    sched = SimScheduler(profile)
    records: list[RequestRecord] = []
    live: dict[SimRequest, tuple[RequestRecord, int, float]] = {}
    arrivals: list[tuple[float, int]] = []
    next_req = 0
    overhead = profile.request_overhead_s
    if concurrency is None:
        assert offsets is not None
        arrivals = [(off + overhead, i) for i, off in enumerate(offsets)]
        heapq.heapify(arrivals)
        last_offset = max(offsets) if offsets else 0.0
    else:
        arrivals = [(overhead, i) for i in range(min(concurrency, len(reqs)))]
        next_req = len(arrivals)
        last_offset = max_duration_s
    clock = 0.0

    def finish(rec: RequestRecord, t: float) -> None:
        nonlocal next_req
        if concurrency is not None and next_req < len(reqs) and t < max_duration_s:
            heapq.heappush(arrivals, (t + overhead, next_req))
            next_req += 1

    while arrivals or sched.has_work:
        if not sched.has_work and arrivals:
            clock = max(clock, arrivals[0][0])
        while arrivals and arrivals[0][0] <= clock:
            at, i = heapq.heappop(arrivals)
            off = at - overhead
            req = reqs[i]
            rec = RequestRecord(
                index=req.index,
                scheduled=off,
                sent=off,
                stream=True,
                requested_input_tokens=req.input_tokens,
                requested_output_tokens=req.output_tokens,
                tags=dict(req.tags),
            )
            records.append(rec)
            sim, n_reason = _sim_request(req, profile, tokenizer, at)
            if sim.prompt_len + sim.max_tokens > profile.max_model_len or not sched.fits_ever(sim):
                rec.status, rec.end = 400, at
                finish(rec, at)
                continue
            if profile.max_waiting is not None and len(sched.waiting) >= profile.max_waiting:
                rec.status, rec.end = 503, at
                finish(rec, at)
                continue
            deadline = min(off + request_timeout_s, last_offset + drain_timeout_s)
            live[sim] = (rec, n_reason, deadline)
            sched.add(sim)
        out = sched.step(clock)
        if out.duration <= 0 and not out.tokens:
            if arrivals:
                clock = arrivals[0][0]
                continue
            break
        clock += out.duration
        for sim in out.tokens:
            rec, n_reason, _ = live[sim]
            if sim.generated <= n_reason:
                rec.chunks.append(Chunk(t=clock, reasoning="r"))
            else:
                rec.chunks.append(Chunk(t=clock, content="c"))
        for sim in out.finished:
            rec, n_reason, _ = live.pop(sim)
            rec.status, rec.end = 200, clock
            rec.prompt_tokens = sim.prompt_len
            rec.completion_tokens = sim.generated
            rec.reasoning_tokens = min(sim.generated, n_reason)
            rec.cached_tokens = sim.cached_tokens
            finish(rec, clock)
        if live and (out.duration > 0):
            expired = [s for s, (_, _, dl) in live.items() if dl <= clock]
            for sim in expired:
                rec, _, dl = live.pop(sim)
                sched.abort(sim)
                rec.status = 200 if rec.chunks else None
                rec.error = ErrorKind.TIMEOUT if dl < last_offset + drain_timeout_s else ErrorKind.CANCELLED
                rec.end = clock
                finish(rec, clock)
    for rec, _, _ in live.values():
        rec.error, rec.end = ErrorKind.CANCELLED, clock
    records.sort(key=lambda r: r.index)
    return records


def simulate_run(cfg: LoadTestConfig, profile: EngineProfile, tokenizer: Tokenizer | None = None) -> RawRun:
    """A :class:`RawRun` of ``cfg``'s load on a simulated engine with ``profile``."""
    tok = tokenizer or load_tokenizer(cfg.metrics.tokenizer)
    reqs, offsets = plan_run(cfg, tok)
    closed = cfg.load.arrival == "concurrency" and cfg.workload.trace is None
    started = time.time()
    records = simulate_records(
        profile,
        reqs,
        None if closed else offsets,
        tok,
        concurrency=cfg.load.concurrency if closed else None,
        request_timeout_s=cfg.target.request_timeout_s,
        drain_timeout_s=cfg.load.drain_timeout_s,
        max_duration_s=cfg.load.max_duration_s,
    )
    target = None if closed or cfg.workload.trace is not None else cfg.load.rate
    sched_rate = None
    if target and len(records) > 1:
        span = max(r.scheduled for r in records) - min(r.scheduled for r in records)
        sched_rate = (len(records) - 1) / span if span > 0 else None
    validity = Validity(
        valid=True,
        reasons=[],
        warnings=["simulated run (virtual time)"],
        target_rate=target,
        scheduled_rate=sched_rate,
        achieved_rate=sched_rate,
        send_lag_p99_s=0.0,
        send_lag_max_s=0.0,
        client_cpu=0.0,
        system_cpu=0.0,
    )
    mode = "concurrency" if closed else ("trace" if cfg.workload.trace else cfg.load.arrival)
    return RawRun(
        records, [], validity, started, time.time() - started, mode, target, {"simulated": profile.name}
    )
