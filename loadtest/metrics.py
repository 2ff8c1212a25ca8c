"""Metric definitions, computed from :class:`~loadtest.records.RequestRecord` only.

Every latency is measured from the request's **scheduled** send time, so a generator
that falls behind (a slow client, a full connection pool) shows up as latency instead
of being hidden (the coordinated-omission flaw of clients that start the clock when the
request is finally sent).

========  ===================================================================
Metric    Definition (per request; seconds)
========  ===================================================================
TTFT      first streamed chunk carrying output on any channel (reasoning or
          content) minus scheduled send time. Role-only, usage-only and empty
          chunks do not count.
TTFC      first chunk carrying final-answer content (or a tool call) minus the
          scheduled send time: reasoning is excluded. This is what a user sees.
TPOT      (last output chunk time - first output chunk time) / (output tokens - 1),
          output tokens from the server's ``usage.completion_tokens`` (reasoning
          included); defined only when output tokens > 1.
ITL       for each pair of consecutive output chunks: the gap divided by the
          number of tokens in the later chunk. One value per gap, pooled over
          all requests for the percentiles.
E2E       arrival of the last byte minus the scheduled send time.
send lag  actual send minus scheduled send (the client's own delay).
========  ===================================================================

Run-level figures: the run lasts from the first scheduled send to the last byte
received. Request throughput is completed requests per second; output (total)
token throughput is completion (prompt + completion) tokens of completed requests per
second; goodput is completed requests per second that met every SLO given. Failed
requests count against goodput. Error and rejection rates are per outcome label
(``http_429``, ``timeout``, ...) over all requests; 429 and 503 are rejections.

Percentiles use linear interpolation between closest ranks (numpy's default), the same
as ``vllm bench serve``.

Aliases in other tools: our TPOT is GuideLLM's ITL and AIPerf's ITL; our ITL is
GenAI-Perf's ITL and (for one-token chunks) vLLM's ITL; our TTFC is GuideLLM's TTFOT
and AIPerf's TTFO.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from loadtest.records import REJECTION_STATUSES, RequestRecord

__all__ = [
    "LATENCY_METRICS",
    "SLO_METRICS",
    "Distribution",
    "RequestMetrics",
    "RunMetrics",
    "compute_run_metrics",
    "distribution",
    "percentile_key",
    "request_metrics",
]

#: Latency metrics that get a distribution in every summary.
LATENCY_METRICS = ("ttft", "ttfc", "tpot", "itl", "e2e", "send_lag")
#: Metrics an SLO may constrain (per-request values; ``itl`` uses the request's worst gap).
SLO_METRICS = ("ttft", "ttfc", "tpot", "itl", "e2e")


@dataclass(slots=True)
class RequestMetrics:
    """Per-request metrics; ``None`` where undefined (non-streamed, failed, one token)."""

    ttft: float | None
    ttfc: float | None
    tpot: float | None
    itls: list[float]
    e2e: float | None
    send_lag: float | None
    output_tokens: int
    input_tokens: int
    ok: bool
    outcome: str

    @property
    def itl_max(self) -> float | None:
        """The worst ITL of the request (what an ITL SLO constrains)."""
        return max(self.itls) if self.itls else None

    def value(self, metric: str) -> float | None:
        """The per-request value an SLO on ``metric`` is checked against."""
        if metric == "itl":
            return self.itl_max
        v = getattr(self, metric)
        return v if v is None else float(v)


def request_metrics(rec: RequestRecord) -> RequestMetrics:
    """Compute one request's metrics from its record."""
    out_chunks = [c for c in rec.chunks if c.has_token]
    first = out_chunks[0].t if out_chunks else None
    last = out_chunks[-1].t if out_chunks else None
    content = next((c.t for c in out_chunks if c.has_content), None)
    chunk_tokens = sum(c.tokens for c in out_chunks)
    output_tokens = rec.completion_tokens if rec.completion_tokens is not None else chunk_tokens
    tpot = None
    if first is not None and last is not None and output_tokens > 1:
        tpot = (last - first) / (output_tokens - 1)
    itls = [(b.t - a.t) / b.tokens for a, b in itertools.pairwise(out_chunks) if b.tokens > 0]
    return RequestMetrics(
        ttft=None if first is None else first - rec.scheduled,
        ttfc=None if content is None else content - rec.scheduled,
        tpot=tpot,
        itls=itls,
        e2e=None if rec.end is None or not rec.ok else rec.end - rec.scheduled,
        send_lag=None if rec.sent is None else rec.sent - rec.scheduled,
        output_tokens=output_tokens if rec.ok else 0,
        input_tokens=(rec.prompt_tokens or rec.requested_input_tokens or 0) if rec.ok else 0,
        ok=rec.ok,
        outcome=rec.outcome,
    )


def percentile_key(p: float) -> str:
    """``99`` -> ``p99``, ``99.9`` -> ``p99.9``."""
    return f"p{p:g}"


@dataclass(slots=True)
class Distribution:
    """Summary statistics of one metric (seconds)."""

    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    percentiles: dict[str, float | None]

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            **self.percentiles,
        }


def distribution(values: Sequence[float], percentiles: Sequence[float]) -> Distribution:
    """Mean, standard deviation, extremes and the requested percentiles of ``values``."""
    if not values:
        return Distribution(0, None, None, None, None, {percentile_key(p): None for p in percentiles})
    arr = np.asarray(values, dtype=float)
    pcts = np.percentile(arr, list(percentiles)) if percentiles else []
    return Distribution(
        count=int(arr.size),
        mean=float(arr.mean()),
        std=float(arr.std()),
        min=float(arr.min()),
        max=float(arr.max()),
        percentiles={percentile_key(p): float(v) for p, v in zip(percentiles, pcts, strict=True)},
    )


@dataclass(slots=True)
class RunMetrics:
    """The scored run: counts, rates, throughputs, distributions and goodput."""

    duration_s: float
    total: int
    completed: int
    outcomes: dict[str, int]
    error_rate: float
    rejection_rate: float
    outcome_rates: dict[str, float]
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    input_tokens: int
    output_tokens: int
    distributions: dict[str, Distribution]
    slos: dict[str, float]
    good_requests: int
    goodput: float
    slo_attainment: float
    per_request: list[RequestMetrics] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "duration_s": self.duration_s,
            "total": self.total,
            "completed": self.completed,
            "outcomes": dict(self.outcomes),
            "outcome_rates": dict(self.outcome_rates),
            "error_rate": self.error_rate,
            "rejection_rate": self.rejection_rate,
            "request_throughput": self.request_throughput,
            "output_token_throughput": self.output_token_throughput,
            "total_token_throughput": self.total_token_throughput,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "latency": {k: d.to_dict() for k, d in self.distributions.items()},
            "goodput": {
                "slos_s": dict(self.slos),
                "good_requests": self.good_requests,
                "requests_per_s": self.goodput,
                "attainment": self.slo_attainment,
            },
        }


def _meets(m: RequestMetrics, slos: Mapping[str, float]) -> bool:
    if not m.ok:
        return False
    for metric, limit in slos.items():
        v = m.value(metric)
        if v is not None and v > limit:
            return False
        if v is None and metric in ("ttft", "ttfc", "e2e"):
            return False
    return True


def compute_run_metrics(
    records: Iterable[RequestRecord],
    percentiles: Sequence[float] = (50, 90, 99),
    slos: Mapping[str, float] | None = None,
    duration_s: float | None = None,
) -> RunMetrics:
    """Score a run. ``slos`` maps metric names of :data:`SLO_METRICS` to limits in seconds;
    ``duration_s`` defaults to the span from the first scheduled send to the last byte."""
    recs = list(records)
    slos = dict(slos or {})
    unknown = set(slos) - set(SLO_METRICS)
    if unknown:
        raise ValueError(f"unknown SLO metric(s): {', '.join(sorted(unknown))}")
    per = [request_metrics(r) for r in recs]
    if duration_s is None:
        starts = [r.scheduled for r in recs]
        ends = [r.end for r in recs if r.end is not None] + [r.scheduled for r in recs]
        duration_s = (max(ends) - min(starts)) if recs else 0.0
    dur = duration_s if duration_s > 0 else math.nan
    outcomes = Counter(m.outcome for m in per)
    total = len(per)
    completed = outcomes.get("ok", 0)
    rejected = sum(n for k, n in outcomes.items() if k in {f"http_{s}" for s in REJECTION_STATUSES})
    errors = total - completed - rejected
    in_tok = sum(m.input_tokens for m in per)
    out_tok = sum(m.output_tokens for m in per)
    values: dict[str, list[float]] = {k: [] for k in LATENCY_METRICS}
    for m in per:
        if m.ok:
            for k in ("ttft", "ttfc", "tpot", "e2e"):
                v = getattr(m, k)
                if v is not None:
                    values[k].append(v)
            values["itl"].extend(m.itls)
        if m.send_lag is not None:
            values["send_lag"].append(m.send_lag)
    good = sum(1 for m in per if _meets(m, slos))

    def rate(n: int) -> float:
        return n / dur if dur == dur else 0.0

    return RunMetrics(
        duration_s=float(duration_s),
        total=total,
        completed=completed,
        outcomes=dict(sorted(outcomes.items())),
        error_rate=errors / total if total else 0.0,
        rejection_rate=rejected / total if total else 0.0,
        outcome_rates={k: n / total for k, n in sorted(outcomes.items())},
        request_throughput=rate(completed),
        output_token_throughput=rate(out_tok),
        total_token_throughput=rate(in_tok + out_tok),
        input_tokens=in_tok,
        output_tokens=out_tok,
        distributions={k: distribution(v, percentiles) for k, v in values.items()},
        slos=slos,
        good_requests=good,
        goodput=rate(good),
        slo_attainment=good / total if total else 0.0,
        per_request=per,
    )
