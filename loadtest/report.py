"""HTML reports with plots (matplotlib, Agg backend, images embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["render_run_report", "render_sweep_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
"""


def _log_scale(ax: Any, axis: str, values: Any) -> None:
    """A log scale on ``axis`` when some value is positive (a metric with no samples, the
    TPOT of single-chunk streams, leaves it linear instead of failing the report)."""
    if any(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _latency_table(latency: dict[str, dict[str, Any]]) -> str:
    keys = [k for k in next(iter(latency.values())) if k not in ("count",)] if latency else []
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["metric (ms)", "count", *keys])
    rows = []
    for name, dist in latency.items():
        cells = "".join(f"<td>{_ms(dist.get(k))}</td>" for k in keys)
        rows.append(f"<tr><th>{name}</th><td>{dist.get('count', 0)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _validity_html(v: dict[str, Any], valid: bool) -> str:
    verdict = '<span class="ok">VALID</span>' if valid else '<span class="bad">INVALID</span>'
    items = "".join(f"<li>{html.escape(r)}</li>" for r in v.get("reasons", []) + v.get("warnings", []))
    fields = [
        "target_rate",
        "scheduled_rate",
        "achieved_rate",
        "send_lag_p99_s",
        "send_lag_max_s",
        "client_cpu",
    ]
    cells = "".join(f"<tr><th>{k}</th><td>{_fmt(v.get(k))}</td></tr>" for k in fields)
    return f"<p>Run validity: {verdict}</p><ul>{items}</ul><table>{cells}</table>"


def _series_plot(series: dict[str, list[list[float]]], names: Sequence[str], title: str) -> str:
    present = [n for n in names if n in series]
    if not present:
        return "<p>No server series were scraped (pass --scrape URL).</p>"
    fig, ax = plt.subplots(figsize=(8, 3))
    for n in present:
        pts = series[n]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=n, drawstyle="steps-post")
    ax.set_xlabel("time since start (s)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def render_run_report(result: dict[str, Any], records: Sequence[dict[str, Any]], path: Path) -> None:
    """One run: headline figures, validity, TTFT distribution, latency over time, queue depth."""
    m = result["metrics"]
    parts = [f"<h1>oss-loadtest run: {html.escape(str(result['workload']))}</h1>"]
    parts.append(
        f"<p>mode {html.escape(str(result['mode']))}, target rate {_fmt(result['target_rate'])}/s, "
        f"{m['total']} requests, {m['completed']} completed, duration {m['duration_s']:.1f} s</p>"
    )
    parts.append(_validity_html(result["validity"], result["valid"]))
    heads = [
        ("request throughput (req/s)", m["request_throughput"]),
        ("output tokens/s", m["output_token_throughput"]),
        ("total tokens/s", m["total_token_throughput"]),
        ("goodput (req/s)", m["goodput"]["requests_per_s"]),
        ("SLO attainment", m["goodput"]["attainment"]),
        ("error rate", m["error_rate"]),
        ("rejection rate", m["rejection_rate"]),
    ]
    parts.append(
        "<table>" + "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in heads) + "</table>"
    )
    parts.append(
        "<h2>Outcomes</h2><table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{n}</td></tr>" for k, n in m["outcomes"].items())
        + "</table>"
    )
    parts.append("<h2>Latency (from scheduled send time)</h2>" + _latency_table(m["latency"]))
    ttft = [r for r in records if r.get("ttft") is not None]
    if ttft:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.hist([r["ttft"] * 1e3 for r in ttft], bins=50, color="#4a7")
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("requests")
        ax.set_title("TTFT distribution")
        parts.append(_png(fig))
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.scatter([r["scheduled"] for r in ttft], [r["ttft"] * 1e3 for r in ttft], s=4, label="TTFT")
        e2e = [r for r in records if r.get("e2e") is not None]
        ax.scatter([r["scheduled"] for r in e2e], [r["e2e"] * 1e3 for r in e2e], s=4, label="E2E")
        ax.set_xlabel("scheduled send (s)")
        ax.set_ylabel("ms")
        _log_scale(ax, "y", [r["ttft"] for r in ttft] + [r["e2e"] for r in e2e])
        ax.legend()
        ax.set_title("Latency over the run")
        parts.append(_png(fig))
    parts.append("<h2>Server-side queue depth</h2>")
    parts.append(
        _series_plot(result.get("server_series", {}), result.get("queue_metrics", []), "queue depth")
    )
    parts.append(
        _series_plot(result.get("server_series", {}), ["vllm:num_requests_running"], "running requests")
    )
    _write(path, "oss-loadtest run", parts)


def _write(path: Path, title: str, parts: list[str]) -> None:
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
    )
    doc += "<body>" + "\n".join(parts) + "</body></html>"
    path.write_text(doc, encoding="utf-8")


def _sweep_row(run: dict[str, Any]) -> str:
    m = run["metrics"]
    lat = m["latency"]
    cells = [
        _fmt(run["target_rate"]),
        _fmt(run["validity"]["achieved_rate"]),
        "yes" if run["valid"] else "<span class=bad>no</span>",
        _fmt(m["request_throughput"]),
        _fmt(m["output_token_throughput"]),
        _ms(lat["ttft"].get("p50")),
        _ms(lat["ttft"].get("p99")),
        _ms(lat["tpot"].get("p50")),
        _fmt(m["error_rate"] + m["rejection_rate"]),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_sweep_report(
    sweep: dict[str, Any],
    runs: Sequence[dict[str, Any]],
    path: Path,
    ttfts: Sequence[Sequence[float]] = (),
) -> None:
    """A sweep: latency percentiles and throughput against rate, the knee, the TTFT
    distribution of every point (``ttfts``, seconds, one list per run), queue depth."""
    rates = [r["target_rate"] for r in runs]
    parts = [f"<h1>oss-loadtest sweep: {html.escape(str(sweep.get('workload')))}</h1>"]
    knee = sweep.get("knee_rate")
    parts.append(
        f"<p>knee (highest unsaturated rate): <b>{_fmt(knee)}</b> req/s; saturation throughput "
        f"<b>{_fmt(sweep.get('saturation_throughput'))}</b> req/s; stopped: "
        f"{html.escape(str(sweep.get('stop_reason')))}</p>"
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, metric in zip(axes, ("ttft", "tpot", "e2e"), strict=True):
        plotted: list[float] = []
        for pk in sweep.get("percentile_keys", ["p50", "p99"]):
            ys = [(r["metrics"]["latency"][metric].get(pk) or float("nan")) * 1e3 for r in runs]
            ax.plot(rates, ys, marker="o", label=pk)
            plotted += ys
        if knee:
            ax.axvline(knee, color="r", ls="--", lw=1)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        _log_scale(ax, "y", plotted)
        ax.legend(fontsize=8)
    parts.append("<h2>Latency percentiles against rate</h2>" + _png(fig))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rates, rates, ls=":", color="gray", label="offered")
    ax.plot(rates, [r["metrics"]["request_throughput"] for r in runs], marker="o", label="completed req/s")
    ax.plot(
        rates, [r["metrics"]["goodput"]["requests_per_s"] for r in runs], marker="s", label="goodput req/s"
    )
    if knee:
        ax.axvline(knee, color="r", ls="--", lw=1, label="knee")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("req/s")
    ax.legend(fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(rates, [r["metrics"]["output_token_throughput"] for r in runs], color="purple", marker="^")
    ax2.set_ylabel("output tokens/s", color="purple")
    parts.append("<h2>Throughput against rate</h2>" + _png(fig))
    rows = "".join(_sweep_row(r) for r in runs)
    parts.append(
        "<table><tr><th>rate</th><th>achieved send rate</th><th>valid</th><th>req/s</th><th>out tok/s</th>"
        "<th>TTFT p50</th><th>TTFT p99</th><th>TPOT p50</th><th>fail rate</th></tr>" + rows + "</table>"
    )
    if ttfts:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for run, values in zip(runs, ttfts, strict=False):
            if values:
                xs = sorted(v * 1e3 for v in values)
                ax.plot(
                    xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{_fmt(run['target_rate'])}/s"
                )
        _log_scale(ax, "x", [v for values in ttfts for v in values])
        ax.set_xlabel("TTFT (ms, from scheduled send)")
        ax.set_ylabel("fraction of requests")
        ax.legend(fontsize=7)
        parts.append("<h2>TTFT distribution per rate</h2>" + _png(fig))
    if runs:
        last = runs[-1]
        parts.append(f"<h2>Server-side queue depth at {_fmt(last['target_rate'])} req/s</h2>")
        parts.append(
            _series_plot(last.get("server_series", {}), last.get("queue_metrics", []), "queue depth")
        )
    _write(path, "oss-loadtest sweep", parts)
