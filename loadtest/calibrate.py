"""Fit a simulated-engine profile from a sweep against a real endpoint.

Only what the client saw is needed (plus ``vllm:cache_config_info`` when scraped):

1. **Step and prefill costs, jointly.** For each completed streamed request, its decode
   window (first to last output chunk) spans ``n - 1`` engine steps. The sequences
   decoding alongside it and the KV tokens they held are rebuilt from all requests of
   the same point, and so are the uncached prompt tokens of requests that started
   during the window (their prefill stalls everyone's steps). Per request:
   ``TPOT = step_base + step_per_seq * running + step_per_kv_token * kv
   + prefill_per_token * prefill_tokens_in_window / (n - 1)``. At the lowest rate each
   request also gives ``TTFT(from send) = request_overhead + step_base + step_per_seq
   + prefill_per_token * uncached_prompt``. All rows are solved together by least
   squares with non-negative coefficients (a term that comes out negative is dropped
   and the rest refitted), so the prefill cost is pinned by both its effect on first
   tokens and its stalls of other requests' decoding.
2. **Fit quality.** ``decode_r2`` is the R^2 of the TPOT rows.
3. **Capacity.** KV blocks and block size from the scraped cache configuration (or the
   configuration), ``max_num_seqs`` from the configuration; the chat template's tokens
   from ``usage.prompt_tokens`` minus the tokens the prompt was built with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.config import CalibrateConfig
from loadtest.records import RequestRecord
from loadtest.scrape import Sample
from loadtest.sim import EngineProfile

__all__ = ["CalibrationPoint", "FitReport", "fit_profile"]


@dataclass
class CalibrationPoint:
    """One sweep point: its records and scraped samples."""

    rate: float
    records: list[RequestRecord]
    samples: list[Sample]


@dataclass
class FitReport:
    """The fitted profile and how well the decode model explains the data."""

    profile: EngineProfile
    decode_r2: float
    decode_samples: int
    prefill_samples: int
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.model_dump(mode="json"),
            "decode_r2": self.decode_r2,
            "decode_samples": self.decode_samples,
            "prefill_samples": self.prefill_samples,
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


def _usable(records: Sequence[RequestRecord]) -> list[_Req]:
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
        out.append(
            _Req(
                r.sent,
                chunks[0].t,
                chunks[-1].t,
                r.completion_tokens,
                prompt,
                prompt - (r.cached_tokens or 0),
            )
        )
    return out


def _cache_config(samples: Sequence[Sample]) -> dict[str, str]:
    for s in samples:
        if s.name == "vllm:cache_config_info":
            return s.labels
    return {}


def _lstsq_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients: the most negative column is dropped
    and the rest refitted until none is negative (an active-set approximation)."""
    cols = list(range(x.shape[1]))
    full = np.zeros(x.shape[1])
    while cols:
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (coef >= 0).all():
            full[cols] = coef
            return full
        cols.pop(int(np.argmin(coef)))
    return full


def _decode_rows(per_point: Sequence[list[_Req]]) -> tuple[list[list[float]], list[float]]:
    """TPOT rows ``[0, 1, running, kv, prefill_tokens / (n - 1)]`` -> TPOT."""
    rows: list[list[float]] = []
    ys: list[float] = []
    for reqs in per_point:
        if not reqs:
            continue
        firsts = np.asarray([q.first for q in reqs])
        lasts = np.asarray([q.last for q in reqs])
        prompts = np.asarray([q.prompt for q in reqs], dtype=float)
        ns = np.asarray([q.n for q in reqs], dtype=float)
        uncs = np.asarray([q.uncached for q in reqs], dtype=float)
        for q in reqs:
            ts = np.linspace(q.first, q.last, 12)[1:-1]
            active = (firsts[None, :] <= ts[:, None]) & (lasts[None, :] >= ts[:, None])
            frac = np.clip((ts[:, None] - firsts[None, :]) / np.maximum(lasts - firsts, 1e-9)[None, :], 0, 1)
            running = float(active.sum(axis=1).mean())
            kv = float((active * (prompts[None, :] + frac * ns[None, :])).sum(axis=1).mean())
            started = (firsts > q.first) & (firsts <= q.last)
            rows.append([0.0, 1.0, running, kv, float(uncs[started].sum()) / (q.n - 1)])
            ys.append((q.last - q.first) / (q.n - 1))
    return rows, ys


def fit_profile(
    points: Sequence[CalibrationPoint], cfg: CalibrateConfig, name: str = "calibrated"
) -> FitReport:
    """Fit an :class:`EngineProfile` to the points of a sweep."""
    notes: list[str] = []
    points = sorted(points, key=lambda p: p.rate)
    per_point = [_usable(p.records) for p in points]
    if sum(len(p) for p in per_point) < 5:
        raise ValueError("too few completed streamed requests with 2+ tokens to fit a profile")
    rows, ys = _decode_rows(per_point)
    low = next(p for p in per_point if p)
    unc = np.asarray([q.uncached for q in low], dtype=float)
    if not (unc.std() > 0.05 * max(unc.mean(), 1.0) and len(low) >= 5):
        notes.append(
            "prompt lengths barely vary at the lowest rate: prefill cost rests on decode stalls only"
        )
    ttft_rows = [[1.0, 1.0, 1.0, 0.0, float(q.uncached)] for q in low]
    ttft_ys = [q.first - q.sent for q in low]
    x = np.asarray(rows + ttft_rows)
    y = np.asarray(ys + ttft_ys)
    coef = _lstsq_nonneg(x, y)
    xd, yd = np.asarray(rows), np.asarray(ys)
    ss_res = float(((yd - xd @ coef) ** 2).sum())
    ss_tot = float(((yd - yd.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    n_rows = len(ys)
    overhead, base, per_seq, per_kv, slope = (float(c) for c in coef)
    cache = next((c for c in (_cache_config(p.samples) for p in points) if c), {})
    blocks = cfg.num_kv_blocks or (int(cache["num_gpu_blocks"]) if cache.get("num_gpu_blocks") else None)
    block_size = int(cache.get("block_size") or cfg.block_size)
    if blocks is None:
        notes.append("no KV block count scraped or configured: assuming it never binds")
        blocks = 1_000_000
    template = [
        r.prompt_tokens - r.requested_input_tokens
        for p in points
        for r in p.records
        if r.ok and r.prompt_tokens is not None and r.requested_input_tokens is not None
    ]
    profile = EngineProfile(
        name=name,
        step_base_s=base,
        step_per_seq_s=per_seq,
        step_per_kv_token_s=per_kv,
        prefill_per_token_s=slope,
        request_overhead_s=overhead,
        block_size=block_size,
        num_kv_blocks=blocks,
        enable_prefix_caching=str(cache.get("enable_prefix_caching", "True")).lower() == "true",
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        chat_template_tokens=max(0, int(np.median(template))) if template else 0,
    )
    return FitReport(profile, r2, n_rows, len(low), notes)
