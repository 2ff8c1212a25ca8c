"""Validation of a calibrated profile on held-out workloads, and the margin a plan takes from it.

``oss-loadtest validate`` sweeps each workload of a validation set (the shipped
``validation_set.yaml``: prefill-heavy, decode-heavy, mixed-length, shared-prefix,
multi-turn and a gpt-oss reasoning-effort mix) twice with the same rates and seeds: for
real against the endpoint and in virtual time with the profile. Per workload it
compares

* the **saturation throughput**: the highest completed request rate of the sweep, and
* the **TTFT p50 at the lowest rate** of the sweep (when the real streams carry no token
  timing, most of them one text chunk at the end, the measured TTFT is the arrival of the
  stream's first event, the role chunk vLLM sends with the first generated token, and the
  row says so),

as relative errors ``predicted / measured - 1``, and writes them with the workload's mean
prompt and output lengths (the ``oss-loadtest/validation/1`` document).

**Margin.** ``oss-loadtest plan --profile P --validation validation.json`` plans on
``usable = capacity x max_utilization x (1 - margin)`` with ``margin`` the largest
absolute saturation-throughput error over the validated workloads: the simulator was
never further off than that on the workloads it was checked on, so a plan that gives
that much away still holds if the new workload is predicted as badly as the worst
validated one. Without a table the margin is ``plan.unvalidated_margin`` and the plan says
that it is not backed by a validation. The TTFT errors are reported in the plan's
assumptions; they are not folded into the margin.

**Range.** The validated range of a factor (mean prompt length, mean output length) is
[smallest, largest] over the validated workloads. A planned workload whose mean lies
below ``smallest / (1 + range_tolerance)`` or above ``largest x (1 + range_tolerance)``
is too far outside: the plan warns, or refuses with ``--refuse-outside``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from loadtest.records import RequestRecord
from loadtest.sweep import SweepResult
from loadtest.tokenizer import WordTokenizer
from loadtest.workload import WorkloadSpec, build_requests

__all__ = [
    "DEFAULT_SET",
    "VALIDATION_SCHEMA",
    "Margin",
    "ValidationSet",
    "load_validation_set",
    "margin_from_validation",
    "outside_validated_range",
    "ttft_error_summary",
    "validation_document",
    "validation_row",
    "workload_lengths",
]

VALIDATION_SCHEMA = "oss-loadtest/validation/1"
DEFAULT_SET = Path(__file__).with_name("validation_set.yaml")
FACTORS = ("input_tokens", "output_tokens")


class ValidationSet(BaseModel):
    """Held-out workloads."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = "validation"
    """Label of the set."""
    workloads: list[WorkloadSpec] = Field(min_length=1)
    """The workloads, each with a unique ``name``."""


def load_validation_set(path: str | Path | None = None) -> ValidationSet:
    """Read a validation set (default: the shipped one)."""
    data = yaml.safe_load(Path(path or DEFAULT_SET).read_text(encoding="utf-8"))
    vs = ValidationSet.model_validate(data)
    names = [w.name for w in vs.workloads]
    if len(set(names)) != len(names):
        raise ValueError(f"workload names of a validation set must be unique: {names}")
    return vs


def workload_lengths(spec: WorkloadSpec, n: int = 256) -> dict[str, float]:
    """Mean prompt tokens (history and shared prefix included) and output tokens of the
    requests the workload asks for."""
    reqs = build_requests(spec, n, WordTokenizer(), "m")
    return {
        "input_tokens": float(np.mean([r.input_tokens for r in reqs])),
        "output_tokens": float(np.mean([r.output_tokens for r in reqs])),
    }


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas <= 0:
        return None
    return pred / meas - 1


def untimed_streams(records: Sequence[RequestRecord]) -> bool:
    """Whether the streams carry no token timing: most completed multi-token streams came
    as one output chunk (gpt-oss-tiny's random weights open no harmony channel, and vLLM
    sends the whole text at the end)."""
    multi = [r for r in records if r.ok and r.stream and (r.completion_tokens or 0) >= 2]
    if not multi:
        return False
    one = sum(1 for r in multi if sum(1 for c in r.chunks if c.has_token) <= 1)
    return one * 2 > len(multi)


def _summary(res: SweepResult) -> dict[str, Any]:
    ttft = res.points[0].metrics.distributions["ttft"].percentiles.get("p50") if res.points else None
    basis = "first token"
    if res.points and untimed_streams(res.points[0].raw.records):
        # the role chunk comes with the first generated token: its arrival is the TTFT the
        # simulator predicts, where the first text chunk is the whole answer's end
        records = res.points[0].raw.records
        firsts = [r.first_event - r.scheduled for r in records if r.ok and r.first_event is not None]
        ttft = float(np.percentile(firsts, 50)) if firsts else None
        basis = "first event (the streams carry no token timing)"
    return {
        "saturation_rps": res.saturation_throughput,
        "ttft_p50_lowest_rate_s": ttft,
        "ttft_basis": basis,
        "saturated": any(p.saturated for p in res.points),
        "rates": [p.rate for p in res.points],
        "valid": all(p.result["valid"] for p in res.points),
    }


def validation_row(spec: WorkloadSpec, measured: SweepResult, predicted: SweepResult) -> dict[str, Any]:
    """One row of the error table."""
    m, p = _summary(measured), _summary(predicted)
    row: dict[str, Any] = {
        "workload": spec.name,
        **workload_lengths(spec),
        "measured": m,
        "predicted": p,
        "saturation_error": _rel(p["saturation_rps"], m["saturation_rps"]),
        "ttft_p50_error": _rel(p["ttft_p50_lowest_rate_s"], m["ttft_p50_lowest_rate_s"]),
    }
    if not m["saturated"]:
        row["note"] = "the measured sweep never saturated: the throughput error is at its highest rate"
    if m["ttft_basis"] != "first token":
        row["ttft_note"] = f"measured TTFT taken at the {m['ttft_basis']}"
    return row


def validation_document(set_name: str, profile: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``oss-loadtest/validation/1`` document ``plan --validation`` reads."""
    return {
        "schema": VALIDATION_SCHEMA,
        "set": set_name,
        "profile": profile,
        "rows": rows,
        "ranges": {f: [min(r[f] for r in rows), max(r[f] for r in rows)] for f in FACTORS},
    }


@dataclass
class Margin:
    """The share of predicted capacity a plan gives away, and where it came from."""

    value: float
    source: str
    validated: bool


def margin_from_validation(doc: dict[str, Any], origin: str = "validation table") -> Margin:
    """Largest absolute saturation-throughput error over the validated workloads."""
    if doc.get("schema") != VALIDATION_SCHEMA:
        raise ValueError(f"{origin} is not an {VALIDATION_SCHEMA} document")
    errors = [
        (abs(r["saturation_error"]), r["workload"]) for r in doc["rows"] if r["saturation_error"] is not None
    ]
    if not errors:
        raise ValueError(f"{origin} has no saturation error to take a margin from")
    value, worst = max(errors)
    if value >= 1:
        raise ValueError(f"{origin}: a saturation error of {value:.0%} ({worst}) leaves no usable capacity")
    return Margin(
        value,
        f"largest |saturation throughput error| over {len(errors)} validated workloads of {origin} "
        f"({worst}: {value:.1%})",
        True,
    )


def outside_validated_range(doc: dict[str, Any], lengths: dict[str, float], tolerance: float) -> list[str]:
    """Why the planned workload is too far from the validated ones (empty when it is not)."""
    out = []
    for f in FACTORS:
        lo, hi = doc["ranges"][f]
        v = lengths[f]
        if v < lo / (1 + tolerance) or v > hi * (1 + tolerance):
            out.append(
                f"mean {f.replace('_', ' ')} {v:.0f} is outside the validated {lo:.0f}-{hi:.0f} "
                f"by more than {tolerance:.0%}"
            )
    return out


def ttft_error_summary(doc: dict[str, Any]) -> str:
    """The TTFT p50 errors of the table, in words (reported, not part of the margin)."""
    errs = [r["ttft_p50_error"] for r in doc["rows"] if r["ttft_p50_error"] is not None]
    if not errs:
        return "no TTFT p50 error was validated"
    worst = max(errs, key=abs)
    return f"validated TTFT p50 errors at low load: largest {worst:+.1%} (not part of the margin)"
