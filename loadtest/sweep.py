"""Rate sweeps: from a low rate up to saturation, stopping once clearly over-saturated.

A point is **saturated** when more than ``max_failure_rate`` of its requests fail or are
rejected, when the served rate (the offered rate less the growth rate of requests in
flight over the second half of the point, see :func:`served_rate`) is under
``saturation_ratio`` of the offered rate,
or when the server falls behind during the point: the median E2E latency of the last
quarter of the requests (by scheduled time) is more than ``saturation_growth`` times
that of the first quarter (a queue that grows for as long as the load lasts). The sweep
stops after ``stop_after_saturated`` saturated points in a row. The **knee** is the
highest rate below the first saturated point; the **saturation throughput** is the
highest completed request throughput seen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.config import LoadTestConfig
from loadtest.metrics import RunMetrics, compute_run_metrics
from loadtest.records import RequestRecord
from loadtest.results import run_result
from loadtest.runner import RawRun

__all__ = [
    "SweepPoint",
    "SweepResult",
    "latency_growth",
    "point_config",
    "run_sweep",
    "served_rate",
    "sweep_rates",
]

RunFn = Callable[[LoadTestConfig], RawRun]
SATURATION_GROWTH = 2.0
MIN_BACKLOG_GROWTH = 3.0


def sweep_rates(cfg: LoadTestConfig) -> list[float]:
    """Explicit rates, or ``start_rate * factor**k`` for ``max_points`` points."""
    s = cfg.sweep
    if s.rates:
        return sorted(s.rates)
    return [s.start_rate * s.factor**k for k in range(s.max_points)]


def point_config(
    cfg: LoadTestConfig, rate: float, duration_s: float, min_requests: int, seed: int
) -> LoadTestConfig:
    """``cfg`` at one rate: requests = rate x duration (at least ``min_requests``)."""
    out = cfg.model_copy(deep=True)
    if out.load.arrival == "concurrency":
        out.load.arrival = "poisson"
    out.load.rate = rate
    out.load.num_requests = max(min_requests, math.ceil(rate * duration_s))
    out.load.max_duration_s = max(duration_s, (out.load.num_requests + 1) / rate * 3)
    out.load.seed = seed
    out.workload = out.workload.model_copy(update={"seed": seed})
    return out


def latency_growth(metrics: RunMetrics, scheduled: list[float]) -> float | None:
    """Median E2E of the last quarter over the first quarter (requests by schedule)."""
    pairs = sorted(
        (s, m.e2e) for s, m in zip(scheduled, metrics.per_request, strict=True) if m.e2e is not None
    )
    q = len(pairs) // 4
    if q < 3:
        return None
    first = float(np.median([e for _, e in pairs[:q]]))
    last = float(np.median([e for _, e in pairs[-q:]]))
    return last / first if first > 0 else None


def served_rate(records: Sequence[RequestRecord]) -> float | None:
    """Requests per second the server absorbed while the load lasted.

    Flow conservation: requests in flight change at (arrival rate - service rate). Over
    the second half of the schedule (past the warm-up) the in-flight count is sampled and
    its slope fitted; the served rate is the schedule's rate minus that slope. A server
    that keeps up gives about the offered rate; an overloaded one gives its capacity.
    Growth over that half of fewer than ``MIN_BACKLOG_GROWTH`` requests, or than twice the
    square root of the mean in-flight count, is noise and gives the offered rate: the
    in-flight count of a server that keeps up is Poisson (its variance is its mean), so
    with requests long against the point (11 s decodes in a 70 s point at 0.44 req/s: 5
    in flight) a fitted growth of 3 came from the arrivals' noise alone and flagged 13 of
    100 seeded points saturated (7 with this threshold), enough to stop a sweep early.
    """
    sends = sorted(r.scheduled for r in records)
    if len(sends) < 8 or sends[-1] <= sends[0]:
        return None
    first, last = sends[0], sends[-1]
    sched = np.asarray([r.scheduled for r in records])
    ends = np.asarray([math.inf if r.end is None else r.end for r in records])
    ts = np.linspace(first + (last - first) / 2, last, 64)
    inflight = ((sched[None, :] <= ts[:, None]) & (ends[None, :] > ts[:, None])).sum(axis=1)
    slope = float(np.polyfit(ts, inflight, 1)[0])
    rate = (len(sends) - 1) / (last - first)
    noise = max(MIN_BACKLOG_GROWTH, 2.0 * math.sqrt(float(inflight.mean())))
    if slope * (last - first) / 2 < noise:
        return rate
    return max(0.0, rate - slope)


@dataclass
class SweepPoint:
    """One rate of a sweep."""

    rate: float
    result: dict[str, Any]
    metrics: RunMetrics
    raw: RawRun
    saturated: bool
    why: list[str]


@dataclass
class SweepResult:
    """All points and the sweep's verdict."""

    points: list[SweepPoint] = field(default_factory=list)
    stop_reason: str = "all rates run"

    @property
    def knee_rate(self) -> float | None:
        knee = None
        for p in self.points:
            if p.saturated:
                break
            knee = p.rate
        return knee

    @property
    def saturation_throughput(self) -> float:
        return max((p.metrics.request_throughput for p in self.points), default=0.0)

    @property
    def saturation_output_tps(self) -> float:
        return max((p.metrics.output_token_throughput for p in self.points), default=0.0)

    def to_dict(self, cfg: LoadTestConfig) -> dict[str, Any]:
        return {
            "schema": "oss-loadtest/sweep/1",
            "workload": cfg.workload.name,
            "rates": [p.rate for p in self.points],
            "saturated": [p.saturated for p in self.points],
            "saturation_reasons": [p.why for p in self.points],
            "valid": [p.result["valid"] for p in self.points],
            "knee_rate": self.knee_rate,
            "saturation_throughput": self.saturation_throughput,
            "saturation_output_token_throughput": self.saturation_output_tps,
            "stop_reason": self.stop_reason,
            "percentile_keys": [f"p{p:g}" for p in cfg.metrics.percentiles if p in (50, 90, 99)] or ["p50"],
            "points": [f"rate_{p.rate:.4g}" for p in self.points],
        }


def run_sweep(
    cfg: LoadTestConfig, run_fn: RunFn, on_point: Callable[[SweepPoint], None] | None = None
) -> SweepResult:
    """Run the sweep of ``cfg.sweep`` with ``run_fn`` (live or simulated)."""
    s = cfg.sweep
    result = SweepResult()
    streak = 0
    for k, rate in enumerate(sweep_rates(cfg)):
        pc = point_config(cfg, rate, s.duration_s, s.min_requests, cfg.load.seed + k)
        raw = run_fn(pc)
        metrics = compute_run_metrics(raw.records, cfg.metrics.percentiles, cfg.metrics.slos)
        why: list[str] = []
        failures = metrics.error_rate + metrics.rejection_rate
        if failures > s.max_failure_rate:
            why.append(f"{failures:.0%} of requests failed or were rejected")
        growth = latency_growth(metrics, [r.scheduled for r in raw.records])
        if growth is not None and growth > SATURATION_GROWTH:
            why.append(f"E2E grew {growth:.1f}x during the point (queue building up)")
        served = served_rate(raw.records)
        offered = raw.validity.scheduled_rate or rate
        if served is not None and served < s.saturation_ratio * offered:
            why.append(f"served {served:.3g} req/s of {offered:.3g} offered")
        point = SweepPoint(rate, run_result(pc, raw, metrics), metrics, raw, bool(why), why)
        result.points.append(point)
        if on_point:
            on_point(point)
        streak = streak + 1 if why else 0
        if streak >= s.stop_after_saturated:
            result.stop_reason = f"{streak} consecutive saturated points"
            break
    return result


def load_sweep(folder: Path, cfg: LoadTestConfig) -> SweepResult:
    """A sweep saved by ``oss-loadtest sweep`` (or a validation's measured side) read back:
    each point's records and scraped samples, its metrics recomputed with ``cfg.metrics``,
    its saturation verdict as saved."""
    from loadtest.results import load_run_records, load_run_samples
    from loadtest.runner import Validity

    doc = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    res = SweepResult(stop_reason=doc["stop_reason"])
    for rate, saturated, why, name in zip(
        doc["rates"], doc["saturated"], doc["saturation_reasons"], doc["points"], strict=True
    ):
        sub = folder / name
        result = json.loads((sub / "result.json").read_text(encoding="utf-8"))
        records = load_run_records(sub)
        raw = RawRun(
            records,
            load_run_samples(sub),
            Validity(**result["validity"]),
            0.0,
            float(result["wall_s"]),
            str(result["mode"]),
            result["target_rate"],
        )
        metrics = compute_run_metrics(records, cfg.metrics.percentiles, cfg.metrics.slos)
        res.points.append(SweepPoint(float(rate), result, metrics, raw, bool(saturated), list(why)))
    return res
