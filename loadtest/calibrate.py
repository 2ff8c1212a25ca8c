"""Fit a simulated-engine profile from a sweep against a real endpoint.

Only what the client saw is needed (plus ``vllm:cache_config_info`` when scraped):

1. **Step and prefill costs, jointly.** For each completed streamed request, its decode
   window (first to last output chunk) spans ``n - 1`` engine steps. The sequences
   decoding alongside it and the KV tokens they held are rebuilt from all requests of
   the same point, at up to ten of its steps (midpoints between consecutive chunks,
   chosen evenly by index, so that every step weighs alike whatever its length), and
   so are the uncached prompt tokens of requests that started during the window
   (their prefill stalls everyone's steps; a request whose first
   token came within half a step of this one's was prefilled in the same step, before
   the window). Per request:
   ``TPOT = step_base + step_per_seq * running + step_per_kv_token * kv
   + (prefill_per_token * prefill_tokens_in_window + prefill_attention *
   prefill_pairs_in_window) / (n - 1)``. At the lowest load each
   request also gives ``TTFT(from send) = request_overhead + step_base + step_per_seq
   + step_per_kv_token * prompt + prefill_per_token * uncached_prompt +
   prefill_attention * pairs`` (the prompt is in the KV cache during its own prefill
   step; ``pairs`` counts the (computed token, attended token) pairs of its prefill,
   :func:`loadtest.sim.prefill_pairs_of`, which grow with the square of the prompt: three
   prompt lengths, or prompts behind a cached prefix, tell them from the linear cost).
   All rows are solved together by least squares with non-negative coefficients (a term
   that comes out negative is dropped and the rest refitted), so the prefill cost is
   pinned by both its effect on first tokens and its stalls of other requests' decoding.
   The fit is done twice: the second time each set of rows (TPOT, first-token) is
   weighted by the inverse of its residual spread in the first, since first tokens are
   far noisier than TPOTs.
2. **Fit quality and uncertainty.** ``decode_r2`` is the R^2 of the TPOT rows. Each
   coefficient gets a standard error from the residual variance of all (weighted) rows and
   ``(X^T X)^-1`` of the columns the non-negativity step kept (columns that the data
   cannot tell apart, a rank-deficient design, get an infinite one). The analytic form
   is used rather than a bootstrap over requests: it is deterministic, costs one matrix
   inverse instead of hundreds of refits with the row rebuilding, and its job here is
   to flag a coefficient the experiment did not pin down, not to give exact intervals.
   Its caveats: the rows are not independent (the running sequences and KV tokens of a
   row are rebuilt from requests that overlap it) and first-token rows are noisier than
   TPOT rows, so the errors are approximate, on the optimistic side. A coefficient is
   **poorly identified** (a note, printed by ``calibrate``) when its relative standard
   error exceeds ``max_relative_se``, when the non-negativity step dropped it, or when
   the regressor that identifies it takes fewer than ``min_levels`` distinct levels
   (lengths within 10% of each other are one level): concurrency (the mean running
   sequences of the TPOT rows) for ``step_per_seq_s``; output length for
   ``step_per_seq_s`` and ``step_per_kv_token_s`` (with one output length the context
   grows the same way in every decode window, and the costs that dominate long outputs
   are extrapolated); prompt length at the lowest load for ``prefill_per_token_s``, and
   three of its levels for ``prefill_attention_s`` (a fixed, a linear and a quadratic cost).
3. **Capacity.** KV blocks and block size from the scraped cache configuration (or the
   configuration), ``max_num_seqs`` from the configuration; the chat template's tokens
   from ``usage.prompt_tokens`` minus the tokens the prompt was built with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.config import CalibrateConfig, CalibrationDesign, LoadTestConfig
from loadtest.records import RequestRecord
from loadtest.scrape import Sample
from loadtest.sim import EngineProfile, prefill_pairs_of
from loadtest.workload import LengthDist, RequestClass, WorkloadSpec

__all__ = [
    "COEFFICIENTS",
    "CalibrationPoint",
    "FitReport",
    "NonnegFit",
    "count_levels",
    "design_configs",
    "design_workload",
    "fit_profile",
    "lstsq_nonneg",
    "template_probe_config",
    "template_tokens_of",
]

#: The fitted step-model coefficients, in the order of the design matrix's columns.
COEFFICIENTS = (
    "request_overhead_s",
    "step_base_s",
    "step_per_seq_s",
    "step_per_kv_token_s",
    "prefill_per_token_s",
    "prefill_attention_s",
    "shared_kv_saving_s",
)


@dataclass
class CalibrationPoint:
    """One sweep point: its records and scraped samples.

    ``rate`` is the point's load level: the offered rate, or the clients of a closed-loop
    point; the lowest level gives the first-token rows of the fit."""

    rate: float
    records: list[RequestRecord]
    samples: list[Sample]


@dataclass
class FitReport:
    """The fitted profile, how well the decode model explains the data, and how well each
    coefficient is pinned down."""

    profile: EngineProfile
    decode_r2: float
    decode_samples: int
    prefill_samples: int
    notes: list[str]
    coefficients: dict[str, float] = field(default_factory=dict)
    """Fitted value of each of :data:`COEFFICIENTS`."""
    standard_errors: dict[str, float] = field(default_factory=dict)
    """Standard error of each coefficient (``inf`` when not identified, ``nan`` when dropped)."""
    poorly_identified: dict[str, list[str]] = field(default_factory=dict)
    """Coefficient -> why it is poorly identified (empty when every one is pinned down)."""

    def relative_se(self, name: str) -> float:
        """Standard error over the value (``inf`` for a zero or unidentified value)."""
        value, se = self.coefficients[name], self.standard_errors[name]
        return se / abs(value) if value != 0 and math.isfinite(se) else math.inf

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "profile": self.profile.model_dump(mode="json"),
            "decode_r2": self.decode_r2,
            "decode_samples": self.decode_samples,
            "prefill_samples": self.prefill_samples,
            "coefficients": {
                k: {
                    "value": v,
                    "standard_error": num(self.standard_errors[k]),
                    "relative_standard_error": num(self.relative_se(k)),
                }
                for k, v in self.coefficients.items()
            },
            "poorly_identified": self.poorly_identified,
            "notes": self.notes,
        }


@dataclass
class _Req:
    sent: float
    first: float
    last: float
    n: int
    prompt: int
    uncached: int
    ticks: list[float] = field(default_factory=list)
    """Times inside its decode window, one per sampled step (midpoints between token chunks
    chosen evenly by index), where the batch it ran in is rebuilt."""
    replica: str = ""
    """The engine replica that served it, when the endpoint said (a fleet behind an
    oss-serving gateway with ``routing.decision_headers``); its batch is rebuilt from the
    requests of the same replica only."""
    group: str = ""
    """Its shared system prompt (the workload's ``prefix_group``), if any."""
    shared: int = 0
    """Tokens of that prompt in full KV blocks: what running sequences of one group share."""


def _first_token(r: RequestRecord) -> float | None:
    return next((c.t for c in r.chunks if c.has_token), None)


def _usable(records: Sequence[RequestRecord], block_size: int) -> list[_Req]:
    """The records a fit can use. A request behind a shared system prompt whose endpoint
    did not report its cached tokens (vLLM without ``--enable-prompt-tokens-details``) is
    taken to have found the prompt's full blocks cached once an earlier request of its
    group had its first token."""
    opened: dict[str, float] = {}
    for r in records:
        g, t = r.tags.get("prefix_group"), _first_token(r)
        if g and t is not None:
            opened[g] = min(t, opened.get(g, math.inf))
    out = []
    for r in records:
        chunks = [c for c in r.chunks if c.has_token]
        if (
            not r.ok
            or len(chunks) < 2
            or r.sent is None
            or not r.completion_tokens
            or r.completion_tokens < 2
        ):
            continue
        prompt = r.prompt_tokens or r.requested_input_tokens or 0
        group = r.tags.get("prefix_group", "")
        shared = int(r.tags.get("prefix_tokens", 0) or 0) // block_size * block_size if group else 0
        cached = r.cached_tokens
        if cached is None:
            cached = min(shared, max(prompt - 1, 0)) if opened.get(group, math.inf) < r.sent else 0
        # a chunk per engine step: the midpoints of chunk gaps chosen evenly by index weight
        # every step alike (midpoints evenly spread in time would over-weight long steps,
        # those with a prefill in them)
        idx = sorted({round(float(k)) for k in np.linspace(1, len(chunks) - 1, min(10, len(chunks) - 1))})
        ticks = [(chunks[k - 1].t + chunks[k].t) / 2 for k in idx]
        out.append(
            _Req(
                r.sent,
                chunks[0].t,
                chunks[-1].t,
                r.completion_tokens,
                prompt,
                prompt - cached,
                ticks,
                str(r.extra.get("replica", "")),
                group,
                shared,
            )
        )
    return out


def _cache_config(samples: Sequence[Sample]) -> dict[str, str]:
    for s in samples:
        if s.name == "vllm:cache_config_info":
            return s.labels
    return {}


@dataclass
class NonnegFit:
    """Non-negative least squares with standard errors."""

    coef: np.ndarray
    se: np.ndarray
    """Standard errors: ``nan`` for dropped columns, ``inf`` for kept ones the data cannot
    separate from the others."""
    dropped: list[int]
    """Columns forced to 0 by the non-negativity step."""
    dof: int


def lstsq_nonneg(x: np.ndarray, y: np.ndarray) -> NonnegFit:
    """Least squares with non-negative coefficients: the most negative column is dropped
    and the rest refitted until none is negative (an active-set approximation); standard
    errors from ``s^2 (X_a^T X_a)^-1`` on the kept columns ``X_a``."""
    k = x.shape[1]
    cols = list(range(k))
    dropped: list[int] = []
    coef = np.zeros(k)
    while cols:
        c, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (c >= 0).all():
            coef[cols] = c
            break
        dropped.append(cols.pop(int(np.argmin(c))))
    se = np.full(k, math.nan)
    dof = x.shape[0] - len(cols)
    if not cols:
        return NonnegFit(coef, se, dropped, dof)
    resid = y - x @ coef
    s2 = float(resid @ resid) / dof if dof > 0 else math.inf
    xa = x[:, cols]
    scale = np.linalg.norm(xa, axis=0)
    scale[scale == 0] = 1.0
    xs = xa / scale
    _, sv, vt = np.linalg.svd(xs, full_matrices=False)
    null = vt[sv <= sv.max() * 1e-9] if sv.size and sv.max() > 0 else vt
    unidentified = (np.abs(null) > 1e-6).any(axis=0) if len(null) else np.zeros(len(cols), bool)
    cov = np.linalg.pinv(xs.T @ xs) * s2
    kept = np.sqrt(np.maximum(np.diag(cov), 0.0)) / scale
    kept[unidentified] = math.inf
    se[cols] = kept
    return NonnegFit(coef, se, dropped, dof)


def count_levels(values: Sequence[float], rel: float = 0.1) -> int:
    """Distinct levels of ``values``: sorted, a new level starts more than ``rel`` above
    the start of the current one (so 512 and 515 tokens are one level)."""
    levels = 0
    start = -math.inf
    for v in sorted(values):
        if v > start * (1 + rel) + 1e-12 or levels == 0:
            levels += 1
            start = v
    return levels


def _decode_rows(per_point: Sequence[list[_Req]]) -> tuple[list[list[float]], list[float]]:
    """TPOT rows ``[0, 1, running, kv, prefill_tokens / (n - 1), prefill_pairs / (n - 1),
    -repeated]`` -> TPOT, where ``repeated`` counts the KV tokens of shared prefix blocks
    read again by a second, third... running sequence of the group (the simulator's
    ``BlockManager.repeated`` times the block size)."""
    rows: list[list[float]] = []
    ys: list[float] = []
    # a fleet's requests ran in the batch of the replica that served them
    groups = [
        [q for q in reqs if q.replica == name]
        for reqs in per_point
        for name in sorted({q.replica for q in reqs})
    ]
    for reqs in groups:
        if not reqs:
            continue
        firsts = np.asarray([q.first for q in reqs])
        lasts = np.asarray([q.last for q in reqs])
        prompts = np.asarray([q.prompt for q in reqs], dtype=float)
        ns = np.asarray([q.n for q in reqs], dtype=float)
        uncs = np.asarray([q.uncached for q in reqs], dtype=float)
        pairs = np.asarray([prefill_pairs_of(q.uncached, q.prompt - q.uncached) for q in reqs])
        groups_of = sorted({q.group for q in reqs if q.group and q.shared})
        member = np.asarray([[q.group == g for q in reqs] for g in groups_of], dtype=bool).reshape(
            -1, len(reqs)
        )
        shared_of = np.asarray([next(q.shared for q in reqs if q.group == g) for g in groups_of], dtype=float)
        for q in reqs:
            ts = np.asarray(q.ticks) if q.ticks else np.linspace(q.first, q.last, 12)[1:-1]
            active = (firsts[None, :] <= ts[:, None]) & (lasts[None, :] >= ts[:, None])
            frac = np.clip((ts[:, None] - firsts[None, :]) / np.maximum(lasts - firsts, 1e-9)[None, :], 0, 1)
            running = float(active.sum(axis=1).mean())
            # per tick and group: (members running - 1) x the group's shared tokens
            in_group = (active[:, None, :] & member[None, :, :]).sum(axis=2)
            repeated = float((np.maximum(in_group - 1, 0) * shared_of[None, :]).sum(axis=1).mean())
            kv = float((active * (prompts[None, :] + frac * ns[None, :])).sum(axis=1).mean())
            # requests whose first token came in the same step as this one's (within half
            # a step: streams of one step arrive a little apart) were prefilled before
            # its window; those in the step of its last token stalled the window
            half = 0.5 * (q.last - q.first) / (q.n - 1)
            started = (firsts > q.first + half) & (firsts <= q.last + half)
            rows.append(
                [
                    0.0,
                    1.0,
                    running,
                    kv,
                    float(uncs[started].sum()) / (q.n - 1),
                    float(pairs[started].sum()) / (q.n - 1),
                    -repeated,
                ]
            )
            ys.append((q.last - q.first) / (q.n - 1))
    return rows, ys


def _identification(
    fit: NonnegFit,
    coefs: dict[str, float],
    ses: dict[str, float],
    levels: dict[str, int],
    cfg: CalibrateConfig,
) -> dict[str, list[str]]:
    why: dict[str, list[str]] = {}
    for j, name in enumerate(COEFFICIENTS):
        if j in fit.dropped:
            why.setdefault(name, []).append("dropped by the non-negativity step (fitted as 0)")
            continue
        value, se = coefs[name], ses[name]
        if not math.isfinite(se):
            why.setdefault(name, []).append("not separable from the other terms in this data")
        elif value == 0 or se / abs(value) > cfg.max_relative_se:
            rse = "inf" if value == 0 else f"{se / abs(value):.0%}"
            why.setdefault(name, []).append(f"relative standard error {rse} > {cfg.max_relative_se:.0%}")
    # (factor, label, levels beyond min_levels): a cost quadratic in the prompt takes a
    # level more than a linear one
    needs = {
        "step_per_seq_s": [("concurrency", "running sequences", 0), ("output", "output lengths", 0)],
        "step_per_kv_token_s": [("output", "output lengths", 0)],
        "prefill_per_token_s": [("prompt", "prompt lengths at the lowest load", 0)],
        "prefill_attention_s": [("prompt", "prompt lengths at the lowest load", 1)],
    }
    for name, factors in needs.items():
        for key, label, extra in factors:
            least = cfg.min_levels + extra
            if levels[key] < least:
                why.setdefault(name, []).append(
                    f"{label} take {levels[key]} distinct level(s), fewer than {least}"
                )
    return why


def fit_profile(
    points: Sequence[CalibrationPoint], cfg: CalibrateConfig, name: str = "calibrated"
) -> FitReport:
    """Fit an :class:`EngineProfile` to the points of a sweep (or of the designed
    experiment), with a standard error per coefficient."""
    notes: list[str] = []
    points = sorted(points, key=lambda p: p.rate)
    cache = next((c for c in (_cache_config(p.samples) for p in points) if c), {})
    block_size = int(cache.get("block_size") or cfg.block_size)
    per_point = [_usable(p.records, block_size) for p in points]
    if sum(len(p) for p in per_point) < 5:
        raise ValueError("too few completed streamed requests with 2+ tokens to fit a profile")
    rows, ys = _decode_rows(per_point)
    # first-token rows: every run at the lowest level that has any (one per prompt block)
    first = next(k for k, p in enumerate(per_point) if p)
    low = [q for k, p in enumerate(per_point) if points[k].rate == points[first].rate for q in p]
    ttft_rows = [
        [
            1.0,
            1.0,
            1.0,
            float(q.prompt),
            float(q.uncached),
            prefill_pairs_of(q.uncached, q.prompt - q.uncached),
            0.0,
        ]
        for q in low
    ]
    ttft_ys = [q.first - q.sent for q in low]
    x = np.asarray(rows + ttft_rows)
    y = np.asarray(ys + ttft_ys)
    fit = lstsq_nonneg(x, y)
    # two blocks of rows with their own noise (TPOT and first-token rows): refit with each
    # block weighted by the inverse of its residual spread, so that the standard errors
    # of the terms pinned by the first-token rows are not set by the quieter TPOT rows
    resid = y - x @ fit.coef
    spread = [float(np.sqrt(np.mean(part**2))) for part in (resid[: len(rows)], resid[len(rows) :])]
    floor = max(max(spread) * 1e-6, 1e-12)
    w = np.concatenate(
        [np.full(len(rows), 1 / max(spread[0], floor)), np.full(len(ttft_rows), 1 / max(spread[1], floor))]
    )
    fit = lstsq_nonneg(x * w[:, None], y * w)
    coef = fit.coef
    xd, yd = np.asarray(rows), np.asarray(ys)
    ss_res = float(((yd - xd @ coef) ** 2).sum())
    ss_tot = float(((yd - yd.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    n_rows = len(ys)
    coefs = {k: float(c) for k, c in zip(COEFFICIENTS, coef, strict=True)}
    ses = {k: float(e) for k, e in zip(COEFFICIENTS, fit.se, strict=True)}
    levels = {
        "concurrency": count_levels([r[2] for r in rows]),
        "output": count_levels([q.n for p in per_point for q in p]),
        "prompt": count_levels([q.uncached for q in low]),
    }
    why = _identification(fit, coefs, ses, levels, cfg)
    if not any(r[COEFFICIENTS.index("shared_kv_saving_s")] for r in rows):
        why["shared_kv_saving_s"] = [
            "no running sequences shared a cached prefix in this data (shared_kv_weight stays 1)"
        ]
    for coefficient, reasons in why.items():
        notes.append(f"{coefficient} is poorly identified: {'; '.join(reasons)}")
    overhead, base, per_seq, per_kv, slope, attention, saving = (coefs[k] for k in COEFFICIENTS)
    # a repeated read of a shared block costs per_kv - saving
    weight = 1.0 - saving / per_kv if per_kv > 0 else 1.0
    if weight < 0:
        notes.append(
            f"a repeated read of a shared KV block fitted as saving more than a KV token costs "
            f"({saving:.3g} s against {per_kv:.3g} s): shared_kv_weight set to 0"
        )
    blocks = cfg.num_kv_blocks or (int(cache["num_gpu_blocks"]) if cache.get("num_gpu_blocks") else None)
    if blocks is None:
        notes.append("no KV block count scraped or configured: assuming it never binds")
        blocks = 1_000_000
    template = template_tokens_of([r for p in points for r in p.records])
    profile = EngineProfile(
        name=name,
        step_base_s=base,
        step_per_seq_s=per_seq,
        step_per_kv_token_s=per_kv,
        shared_kv_weight=min(1.0, max(0.0, weight)),
        prefill_per_token_s=slope,
        prefill_attention_s=attention,
        request_overhead_s=overhead,
        block_size=block_size,
        num_kv_blocks=blocks,
        enable_prefix_caching=str(cache.get("enable_prefix_caching", "True")).lower() == "true",
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        chat_template_tokens=(
            cfg.chat_template_tokens if cfg.chat_template_tokens is not None else template or 0
        ),
        chat_template_system_tokens=cfg.chat_template_system_tokens,
    )
    return FitReport(profile, r2, n_rows, len(low), notes, coefs, ses, why)


def design_workload(
    design: CalibrationDesign, seed: int = 0, inputs: Sequence[int] | None = None, shared: bool = False
) -> WorkloadSpec:
    """One class per (prompt length, output length) cell of the design (prompt lengths
    ``inputs``, default all of them), equal weights; with ``shared``, the shared-prefix
    block's classes (one per output length)."""
    if shared and design.shared_prefix is not None:
        return WorkloadSpec(
            name="calibration-shared-prefix",
            seed=seed,
            classes=[
                RequestClass(
                    name=f"shared-out{o}",
                    api=design.api,
                    # one set of system prompts for every output length
                    shared_prefix=design.shared_prefix.model_copy(update={"name": "design"}),
                    input_tokens=LengthDist(value=design.shared_prefix_input_tokens),
                    output_tokens=LengthDist(value=o),
                )
                for o in design.output_tokens
            ],
        )
    classes = [
        RequestClass(
            name=f"in{i}-out{o}",
            api=design.api,
            input_tokens=LengthDist(value=i),
            output_tokens=LengthDist(value=o),
        )
        for i in (inputs or design.input_tokens)
        for o in design.output_tokens
    ]
    return WorkloadSpec(name="calibration-design", seed=seed, classes=classes)


def warmup_configs(cfg: LoadTestConfig) -> list[LoadTestConfig]:
    """The unfitted warm-up before the design: for each prompt length, ``warmup_requests``
    requests (the shortest output) one at a time; none when it is off."""
    d = cfg.calibrate.design
    out = []
    for i in d.input_tokens if d.warmup_requests else []:
        wc = cfg.model_copy(deep=True)
        cls = RequestClass(
            name=f"warmup-in{i}",
            api=d.api,
            input_tokens=LengthDist(value=i),
            output_tokens=LengthDist(value=min(d.output_tokens)),
        )
        wc.workload = WorkloadSpec(name="calibration-warmup", seed=cfg.load.seed, classes=[cls])
        wc.load.arrival = "concurrency"
        wc.load.concurrency = 1
        wc.load.num_requests = d.warmup_requests
        wc.load.max_duration_s = d.max_duration_s
        out.append(wc)
    return out


def template_probe_config(cfg: LoadTestConfig) -> LoadTestConfig:
    """Two short chat requests whose messages open with a system message, one at a time:
    their ``usage.prompt_tokens`` less the tokens asked for is what the chat template adds
    then (``chat_template_system_tokens``)."""
    pc = cfg.model_copy(deep=True)
    cls = RequestClass.model_validate(
        {
            "name": "template-probe",
            "api": "chat",
            "shared_prefix": {"groups": 2, "tokens": 32},
            "input_tokens": 16,
            "output_tokens": 2,
        }
    )
    pc.workload = WorkloadSpec(name="calibration-template-probe", seed=cfg.load.seed, classes=[cls])
    pc.load.arrival = "concurrency"
    pc.load.concurrency = 1
    pc.load.num_requests = 2
    pc.load.max_duration_s = cfg.calibrate.design.max_duration_s
    return pc


def template_tokens_of(records: Sequence[RequestRecord]) -> int | None:
    """Median of ``prompt_tokens - requested_input_tokens`` over the completed records."""
    extra = [
        r.prompt_tokens - r.requested_input_tokens
        for r in records
        if r.ok and r.prompt_tokens is not None and r.requested_input_tokens is not None
    ]
    return max(0, int(np.median(extra))) if extra else None


def design_configs(cfg: LoadTestConfig) -> list[LoadTestConfig]:
    """The runs of the designed calibration: at each concurrency level of
    ``cfg.calibrate.design``, a closed loop per prompt-length block (or one of the whole mix),
    seeds differing by run."""
    d = cfg.calibrate.design
    # (prompt lengths of the block, the share of a level's requests it takes in prompt
    # lengths' worth); the shared-prefix block takes one prompt length's share
    blocks: list[tuple[list[int] | None, int]] = (
        [([i], 1) for i in d.input_tokens]
        if d.blocks == "prompt"
        else [(list(d.input_tokens), len(d.input_tokens))]
    )
    if d.shared_prefix is not None:
        blocks.append((None, 1))
    out = []
    seed = cfg.load.seed
    for c in d.concurrency:
        for inputs, weight in blocks:
            cells = (len(inputs) if inputs else 1) * len(d.output_tokens)
            pc = cfg.model_copy(deep=True)
            pc.workload = design_workload(d, seed=seed, inputs=inputs, shared=inputs is None)
            pc.load.arrival = "concurrency"
            pc.load.concurrency = c
            share = -(-c * d.requests_per_client * weight // len(d.input_tokens))
            pc.load.num_requests = max(share, cells * d.requests_per_cell)
            pc.load.max_duration_s = d.max_duration_s
            pc.load.seed = seed
            seed += 1
            out.append(pc)
    return out
