"""The highest request rate per replica that meets given SLOs, with a confidence interval.

One search: start at ``start_rate``, double until a rate fails, then bisect (geometric
midpoints) between the highest passing and the lowest failing rate until they are within
``rel_tolerance``. A rate passes when every SLO holds at the chosen percentile (e.g. TTFT
p99 <= 2 s), errors and rejections stay under ``max_failure_rate``, SLO attainment is at
least ``min_attainment``, and the run is valid. The search is repeated ``repeats`` times
with different seeds (arrivals and prompts); the answer is the mean of the boundaries with
a Student-t interval, divided by the replicas behind the endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.config import LoadTestConfig
from loadtest.metrics import RunMetrics, compute_run_metrics, percentile_key
from loadtest.runner import RawRun
from loadtest.stats import mean_ci
from loadtest.sweep import point_config

__all__ = ["SLO_SCHEMA", "SloSearchResult", "Trial", "check_slos", "search_boundary", "slo_search"]

SLO_SCHEMA = "oss-loadtest/slo/1"
RunFn = Callable[[LoadTestConfig], RawRun]


@dataclass
class Trial:
    """One rate tried."""

    rate: float
    passed: bool
    binding: list[str]
    figures: dict[str, float | None]


def check_slos(
    cfg: LoadTestConfig, metrics: RunMetrics, valid: bool
) -> tuple[bool, list[str], dict[str, float | None]]:
    """Whether a run meets the SLOs; the violated constraints; the checked figures."""
    s = cfg.slo_search
    pk = percentile_key(s.percentile)
    failed: list[str] = []
    figures: dict[str, float | None] = {}
    for metric, limit in cfg.metrics.slos.items():
        value = metrics.distributions[metric].percentiles.get(pk)
        figures[f"{metric}_{pk}"] = value
        if value is None or value > limit:
            failed.append(
                f"{metric} {pk} {'-' if value is None else f'{value * 1e3:.0f} ms'} > {limit * 1e3:.0f} ms"
            )
    failures = metrics.error_rate + metrics.rejection_rate
    figures["failure_rate"] = failures
    if failures > s.max_failure_rate:
        failed.append(f"failure rate {failures:.1%} > {s.max_failure_rate:.1%}")
    figures["attainment"] = metrics.slo_attainment
    if s.min_attainment and metrics.slo_attainment < s.min_attainment:
        failed.append(f"SLO attainment {metrics.slo_attainment:.1%} < {s.min_attainment:.1%}")
    if not valid:
        failed.append("run invalid (generator could not hold its schedule)")
    return not failed, failed, figures


def search_boundary(
    cfg: LoadTestConfig, run_fn: RunFn, seed: int, on_trial: Callable[[Trial], None] | None = None
) -> tuple[float, list[Trial]]:
    """One search; returns the highest passing rate (0 if none) and the trials."""
    s = cfg.slo_search
    trials: list[Trial] = []

    def trial(rate: float) -> bool:
        pc = point_config(cfg, rate, s.duration_s, s.min_requests, seed * 1000 + len(trials))
        raw = run_fn(pc)
        metrics = compute_run_metrics(
            raw.records, sorted({*cfg.metrics.percentiles, s.percentile}), cfg.metrics.slos
        )
        ok, binding, figures = check_slos(cfg, metrics, raw.validity.valid)
        t = Trial(rate, ok, binding, figures)
        trials.append(t)
        if on_trial:
            on_trial(t)
        return ok

    lo, hi = 0.0, math.inf
    rate = s.start_rate
    if trial(rate):
        lo = rate
        while rate * 2 <= s.max_rate:
            rate *= 2
            if trial(rate):
                lo = rate
            else:
                hi = rate
                break
    else:
        hi = rate
        for _ in range(8):
            rate /= 2
            if trial(rate):
                lo = rate
                break
            hi = rate
    if lo == 0.0 or math.isinf(hi):
        return lo, trials
    while hi / lo - 1 > s.rel_tolerance:
        mid = math.sqrt(lo * hi)
        if trial(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


@dataclass
class SloSearchResult:
    """Boundaries of every repeat and the per-replica answer."""

    boundaries: list[float]
    trials: list[list[Trial]] = field(default_factory=list)
    replicas: int = 1
    confidence: float = 0.9

    def to_dict(self, cfg: LoadTestConfig) -> dict[str, Any]:
        mean, low, high = mean_ci(self.boundaries, self.confidence) if self.boundaries else (0.0, 0.0, 0.0)
        r = self.replicas
        return {
            "schema": SLO_SCHEMA,
            "workload": cfg.workload.name,
            "slos_s": dict(cfg.metrics.slos),
            "percentile": cfg.slo_search.percentile,
            "replicas": r,
            "boundaries": self.boundaries,
            "rate_per_replica": {"mean": mean / r, "low": max(0.0, low) / r, "high": high / r},
            "confidence": self.confidence,
            "trials": [
                [
                    {"rate": t.rate, "passed": t.passed, "violations": t.binding, "figures": t.figures}
                    for t in ts
                ]
                for ts in self.trials
            ],
        }


def slo_search(
    cfg: LoadTestConfig, run_fn: RunFn, on_trial: Callable[[int, Trial], None] | None = None
) -> SloSearchResult:
    """``repeats`` independent searches."""
    if not cfg.metrics.slos:
        raise ValueError("give at least one SLO (e.g. --slo ttft:2000 --slo tpot:50)")
    res = SloSearchResult([], [], cfg.target.replicas, cfg.slo_search.confidence)
    for k in range(cfg.slo_search.repeats):
        cb = (lambda t, k=k: on_trial(k, t)) if on_trial else None
        b, trials = search_boundary(cfg, run_fn, cfg.load.seed + k + 1, cb)
        res.boundaries.append(b)
        res.trials.append(trials)
    return res
