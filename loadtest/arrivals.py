"""Arrival processes: when each request is scheduled to be sent.

All open-loop processes return offsets in seconds from the start of the run, sorted,
drawn from a seeded generator so that a run can be repeated exactly. Unlike
``vllm bench serve`` the offsets are **not** rescaled so that the last arrival lands at
``n / rate``: that rescaling hides the real variance of a Poisson process.

- ``poisson``: exponential gaps with mean ``1 / rate``.
- ``gamma``: gamma gaps with shape ``burstiness`` and scale ``1 / (rate * burstiness)``
  (mean ``1 / rate``; coefficient of variation ``1 / sqrt(burstiness)``; burstiness 1 is
  Poisson, below 1 is burstier, large values approach constant). Same parameters as
  vLLM's ``--burstiness`` and AIPerf's ``--arrival-smoothness``.
- ``constant``: gaps of exactly ``1 / rate``.
- ``trace``: the timestamps of a trace, optionally sped up.

Fixed concurrency is a closed loop and has no schedule: see :mod:`loadtest.runner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["ArrivalKind", "schedule", "trace_schedule"]

ArrivalKind = Literal["poisson", "gamma", "constant"]


def schedule(
    kind: ArrivalKind,
    rate: float,
    num_requests: int,
    *,
    burstiness: float = 1.0,
    max_duration_s: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Send offsets (seconds) of up to ``num_requests`` requests at ``rate`` per second.

    The first request is sent at 0. With ``max_duration_s`` the schedule stops at the
    last offset below that bound.
    """
    if rate <= 0 or not np.isfinite(rate):
        raise ValueError("rate must be a positive finite number of requests per second")
    if num_requests < 1:
        raise ValueError("num_requests must be at least 1")
    if burstiness <= 0:
        raise ValueError("burstiness must be positive")
    rng = np.random.default_rng(seed)
    n_gaps = num_requests - 1
    if kind == "constant":
        gaps = np.full(n_gaps, 1.0 / rate)
    elif kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n_gaps)
    elif kind == "gamma":
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n_gaps)
    else:
        raise ValueError(f"unknown arrival process {kind!r}")
    offsets = np.concatenate([[0.0], np.cumsum(gaps)])
    if max_duration_s is not None:
        offsets = offsets[offsets < max_duration_s]
    return [float(x) for x in offsets]


def trace_schedule(timestamps: Sequence[float], speedup: float = 1.0) -> list[float]:
    """Offsets of a trace's timestamps, shifted to start at 0 and divided by ``speedup``."""
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    if not timestamps:
        return []
    t0 = min(timestamps)
    return sorted((t - t0) / speedup for t in timestamps)
