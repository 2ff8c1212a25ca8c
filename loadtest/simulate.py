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
from dataclasses import dataclass
from typing import Any

from loadtest.config import FleetConfig, LoadTestConfig
from loadtest.fleet import FleetRouter, ReplicaState
from loadtest.records import Chunk, ErrorKind, RequestRecord
from loadtest.runner import RawRun, Validity, plan_run
from loadtest.sim import EngineProfile, SimRequest, SimScheduler, block_hashes
from loadtest.sim.profile import template_tokens
from loadtest.sim.scheduler import StepOutput
from loadtest.sim.server import prompt_text
from loadtest.tokenizer import Tokenizer, load_tokenizer
from loadtest.workload import PlannedRequest

__all__ = ["FleetRun", "simulate_fleet", "simulate_records", "simulate_run"]


def _sim_request(
    req: PlannedRequest, profile: EngineProfile, tokenizer: Tokenizer, arrival: float
) -> tuple[SimRequest, int]:
    chat = req.path.endswith("chat/completions")
    ids = tokenizer.encode(prompt_text(req.body, chat))
    prompt_len = len(ids) + (template_tokens(profile, req.body) if chat else 0)
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


@dataclass
class FleetRun:
    """Records of a simulated run, and what the fleet's router and caches did."""

    records: list[RequestRecord]
    routed: dict[str, int]
    """Requests each replica was sent."""
    reasons: dict[str, int]
    """Routing decisions by reason (``affinity``, ``load``, ``fallback``, ``round_robin``)."""
    prefix_queries: int
    """Prompt tokens looked up in the replicas' prefix caches."""
    prefix_hits: int
    """Of which found cached."""

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit rate over the fleet (hit tokens / queried tokens), vLLM's definition."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "replicas": len(self.routed),
            "routed": self.routed,
            "reasons": self.reasons,
            "prefix_cache_hit_rate": self.hit_rate,
        }


def simulate_fleet(
    profile: EngineProfile,
    reqs: list[PlannedRequest],
    offsets: list[float] | None,
    tokenizer: Tokenizer,
    *,
    fleet: FleetConfig | None = None,
    concurrency: int | None = None,
    request_timeout_s: float = 600.0,
    drain_timeout_s: float = 120.0,
    max_duration_s: float = 3600.0,
) -> FleetRun:
    """``reqs`` sent on ``offsets`` (open loop) or by ``concurrency`` clients to
    ``fleet.replicas`` simulated engines behind ``fleet.routing``, on one virtual clock."""
    fleet = fleet or FleetConfig()
    replicas = [ReplicaState(f"r{i}", SimScheduler(profile)) for i in range(fleet.replicas)]
    router = FleetRouter(fleet, profile.num_kv_blocks, fleet.seed)
    records: list[RequestRecord] = []
    live: dict[SimRequest, tuple[RequestRecord, int, float, int]] = {}
    pending: dict[int, StepOutput] = {}
    steps: list[tuple[float, int]] = []
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

    def finish(t: float) -> None:
        nonlocal next_req
        if concurrency is not None and next_req < len(reqs) and t < max_duration_s:
            heapq.heappush(arrivals, (t + overhead, next_req))
            next_req += 1

    def arrive(at: float, i: int) -> None:
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
        probe = replicas[0].sched
        if sim.prompt_len + sim.max_tokens > profile.max_model_len or not probe.fits_ever(sim):
            rec.status, rec.end = 400, at
            finish(at)
            return
        j = router.choose(replicas, sim.hashes, at)
        rep = replicas[j]
        rec.extra["replica"] = rep.name
        rep.routed += 1
        if profile.max_waiting is not None and len(rep.sched.waiting) >= profile.max_waiting:
            rec.status, rec.end = 503, at
            finish(at)
            return
        deadline = min(off + request_timeout_s, last_offset + drain_timeout_s)
        live[sim] = (rec, n_reason, deadline, j)
        rep.ongoing += 1
        rep.sched.add(sim)

    def step_done(j: int, t: float) -> None:
        out = pending.pop(j)
        rep = replicas[j]
        rep.busy_until = None
        for sim in out.tokens:
            rec, n_reason, _, _ = live[sim]
            if sim.generated <= n_reason:
                rec.chunks.append(Chunk(t=t, reasoning="r"))
            else:
                rec.chunks.append(Chunk(t=t, content="c"))
        for sim in out.finished:
            rec, n_reason, _, _ = live.pop(sim)
            rec.status, rec.end = 200, t
            rec.prompt_tokens = sim.prompt_len
            rec.completion_tokens = sim.generated
            rec.reasoning_tokens = min(sim.generated, n_reason)
            rec.cached_tokens = sim.cached_tokens
            rep.ongoing -= 1
            finish(t)

    def expire(t: float) -> None:
        for sim in [s for s, (_, _, dl, _) in live.items() if dl <= t]:
            rec, _, dl, j = live.pop(sim)
            replicas[j].sched.abort(sim)
            replicas[j].ongoing -= 1
            rec.status = 200 if rec.chunks else None
            rec.error = ErrorKind.TIMEOUT if dl < last_offset + drain_timeout_s else ErrorKind.CANCELLED
            rec.end = t
            finish(t)

    while True:
        for j, rep in enumerate(replicas):
            if rep.busy_until is None and rep.sched.has_work:
                out = rep.sched.step(clock)
                if out.duration <= 0 and not out.tokens:
                    continue  # nothing schedulable until something arrives
                rep.busy_until = clock + out.duration
                pending[j] = out
                heapq.heappush(steps, (rep.busy_until, j))
        if not steps and not arrivals:
            break
        clock = min(x[0][0] for x in (steps, arrivals) if x)
        ended = False
        while steps and steps[0][0] <= clock:
            _, j = heapq.heappop(steps)
            step_done(j, clock)
            ended = True
        while arrivals and arrivals[0][0] <= clock:
            arrive(*heapq.heappop(arrivals))
        if live and ended:
            expire(clock)
    for rec, _, _, _ in live.values():
        rec.error, rec.end = ErrorKind.CANCELLED, clock
    records.sort(key=lambda r: r.index)
    return FleetRun(
        records=records,
        routed={r.name: r.routed for r in replicas},
        reasons=dict(router.reasons),
        prefix_queries=sum(r.sched.prefix_queries for r in replicas),
        prefix_hits=sum(r.sched.prefix_hits for r in replicas),
    )


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
    """Records of ``reqs`` sent on ``offsets`` (open loop) or by ``concurrency`` clients
    to one simulated engine."""
    return simulate_fleet(
        profile,
        reqs,
        offsets,
        tokenizer,
        concurrency=concurrency,
        request_timeout_s=request_timeout_s,
        drain_timeout_s=drain_timeout_s,
        max_duration_s=max_duration_s,
    ).records


def simulate_run(cfg: LoadTestConfig, profile: EngineProfile, tokenizer: Tokenizer | None = None) -> RawRun:
    """A :class:`RawRun` of ``cfg``'s load on a simulated engine with ``profile``."""
    tok = tokenizer or load_tokenizer(cfg.metrics.tokenizer)
    reqs, offsets = plan_run(cfg, tok)
    closed = cfg.load.arrival == "concurrency" and cfg.workload.trace is None
    started = time.time()
    run = simulate_fleet(
        profile,
        reqs,
        None if closed else offsets,
        tok,
        fleet=cfg.fleet,
        concurrency=cfg.load.concurrency if closed else None,
        request_timeout_s=cfg.target.request_timeout_s,
        drain_timeout_s=cfg.load.drain_timeout_s,
        max_duration_s=cfg.load.max_duration_s,
    )
    records = run.records
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
        records,
        [],
        validity,
        started,
        time.time() - started,
        mode,
        target,
        {"simulated": profile.name, "fleet": run.summary() | {"routing": cfg.fleet.routing}},
    )


def compare_routing(
    cfg: LoadTestConfig,
    profile: EngineProfile,
    replicas: int,
    tokenizer: Tokenizer | None = None,
) -> list[dict[str, Any]]:
    """``cfg``'s load on ``replicas`` simulated replicas under each routing policy we ship,
    plus one replica with the KV cache of all of them (the hit-rate reference: every request
    meets every earlier prefix in one cache). Rows: ``policy``, ``hit_rate``,
    ``ttft_p50_s``, ``ttft_p99_s``, ``ttft_mean_s``, ``request_throughput``, ``routed``, ``reasons``."""
    from loadtest.metrics import compute_run_metrics

    tok = tokenizer or load_tokenizer(cfg.metrics.tokenizer)
    big = profile.model_copy(update={"num_kv_blocks": profile.num_kv_blocks * replicas})
    runs: list[tuple[str, EngineProfile, FleetConfig]] = [
        ("single replica (KV of all)", big, cfg.fleet.model_copy(update={"replicas": 1})),
    ]
    for policy in ("round_robin", "power_of_two", "prefix"):
        fc = cfg.fleet.model_copy(update={"replicas": replicas, "routing": policy})
        runs.append((policy, profile, fc))
    rows = []
    for name, prof, fc in runs:
        c = cfg.model_copy(deep=True)
        c.fleet = fc
        raw = simulate_run(c, prof, tok)
        m = compute_run_metrics(raw.records, [50.0, 99.0], None)
        fleet = raw.meta["fleet"]
        assert isinstance(fleet, dict)
        ttft = m.distributions["ttft"].percentiles
        rows.append(
            {
                "policy": name,
                "replicas": fc.replicas,
                "hit_rate": fleet["prefix_cache_hit_rate"],
                "ttft_p50_s": ttft.get("p50"),
                "ttft_p99_s": ttft.get("p99"),
                "ttft_mean_s": m.distributions["ttft"].mean,
                "request_throughput": m.request_throughput,
                "completed": m.completed,
                "routed": fleet["routed"],
                "reasons": fleet["reasons"],
            }
        )
    return rows
