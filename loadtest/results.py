"""Result files: JSON (documented schema), CSV, JSONL, and the server series.

A run folder holds:

- ``result.json``: ``{"schema": "oss-loadtest/run/1", ...}`` (see ``loadtest/README.md``);
- ``requests.jsonl``: one :meth:`RequestRecord.to_dict` per line;
- ``server_metrics.jsonl``: every scraped sample ``{t, target, name, labels, value}``;
- ``summary.csv``: one row of the headline figures.

A sweep folder holds ``sweep.json`` (``oss-loadtest/sweep/1``), ``sweep.csv`` (one row
per rate) and one run folder per point.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loadtest.config import LoadTestConfig
from loadtest.metrics import LATENCY_METRICS, RunMetrics
from loadtest.records import RequestRecord
from loadtest.runner import RawRun
from loadtest.scrape import Sample

__all__ = [
    "RUN_SCHEMA",
    "SWEEP_SCHEMA",
    "csv_row",
    "load_run_records",
    "run_result",
    "server_series",
    "write_csv",
    "write_run",
]

RUN_SCHEMA = "oss-loadtest/run/1"
SWEEP_SCHEMA = "oss-loadtest/sweep/1"
SERIES_OF_INTEREST = ("vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def server_series(samples: Iterable[Sample], names: Sequence[str]) -> dict[str, list[list[float]]]:
    """``name -> [[t, value], ...]`` with values summed over targets and labels per scrape."""
    acc: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        if s.name in names:
            acc[s.name][round(s.t, 3)] += s.value
    return {n: [[t, v] for t, v in sorted(acc[n].items())] for n in names if n in acc}


def run_result(cfg: LoadTestConfig, raw: RawRun, metrics: RunMetrics) -> dict[str, Any]:
    """The ``result.json`` document of one run."""
    names = list(dict.fromkeys([*cfg.scrape.queue_metrics, *SERIES_OF_INTEREST]))
    return {
        "schema": RUN_SCHEMA,
        "started_at": dt.datetime.fromtimestamp(raw.started_at, dt.UTC).isoformat(),
        "wall_s": raw.wall_s,
        "mode": raw.mode,
        "target_rate": raw.target_rate,
        "concurrency": cfg.load.concurrency if raw.mode == "concurrency" else None,
        "workload": cfg.workload.name,
        "valid": raw.validity.valid,
        "validity": raw.validity.to_dict(),
        "metrics": metrics.to_dict(),
        "server_series": server_series(raw.samples, names),
        "queue_metrics": list(cfg.scrape.queue_metrics),
        "config": cfg.model_dump(mode="json"),
        "meta": dict(raw.meta),
    }


def csv_row(result: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of a run result as one flat CSV row (latencies in ms)."""
    m = result["metrics"]
    v = result["validity"]
    row: dict[str, Any] = {
        "mode": result["mode"],
        "target_rate": result["target_rate"],
        "achieved_rate": v["achieved_rate"],
        "valid": result["valid"],
        "requests": m["total"],
        "completed": m["completed"],
        "error_rate": m["error_rate"],
        "rejection_rate": m["rejection_rate"],
        "request_throughput": m["request_throughput"],
        "output_token_throughput": m["output_token_throughput"],
        "total_token_throughput": m["total_token_throughput"],
        "goodput": m["goodput"]["requests_per_s"],
        "send_lag_p99_ms": None if v["send_lag_p99_s"] is None else v["send_lag_p99_s"] * 1e3,
        "client_cpu": v["client_cpu"],
    }
    for name in LATENCY_METRICS:
        dist = m["latency"].get(name, {})
        for key, val in dist.items():
            if key in ("count", "std", "min", "max"):
                continue
            row[f"{name}_{key}_ms"] = None if val is None else val * 1e3
    return row


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows with the union of their keys as the header."""
    keys: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_run(folder: Path, result: dict[str, Any], raw: RawRun) -> None:
    """Write a run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    with (folder / "requests.jsonl").open("w", encoding="utf-8") as fh:
        for rec in raw.records:
            fh.write(json.dumps(rec.to_dict()) + "\n")
    with (folder / "server_metrics.jsonl").open("w", encoding="utf-8") as fh:
        for s in raw.samples:
            fh.write(json.dumps(s.to_dict()) + "\n")
    write_csv(folder / "summary.csv", [csv_row(result)])


def load_run_samples(folder: Path) -> list[Sample]:
    """The scraped samples of a run folder (none when it has no ``server_metrics.jsonl``)."""
    path = folder / "server_metrics.jsonl"
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [Sample(**json.loads(line)) for line in fh if line.strip()]


def load_run_records(folder: Path) -> list[RequestRecord]:
    """The per-request records of a run folder."""
    with (folder / "requests.jsonl").open(encoding="utf-8") as fh:
        return [RequestRecord.from_dict(json.loads(line)) for line in fh if line.strip()]
