"""Calibrate a simulated-engine profile on one workload, predict another, compare.

1. Sweep workload A (chat, half 64-token and half 768-token prompts, 32 output tokens;
   ``--workload-a uniform``: prompts of 64-512 tokens) against a real endpoint,
   scraping its ``/metrics``; fit a profile (``loadtest.calibrate``).
2. Predict workload B (input 512, output 96 tokens) at the same rates with the
   virtual-time simulator and that profile.
3. Sweep workload B against the real endpoint.
4. Print predicted and measured saturation throughput (highest completed request rate
   of the sweep) and p50 TTFT at the lowest rate, and the prediction errors
   (target: within 15%).

Start the engine first, e.g. (SmolLM2-135M on vLLM CPU)::

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m vllm.entrypoints.openai.api_server \\
        --model ~/.cache/oss-serving/models/smollm2-135m-instruct --served-model-name smollm2 \\
        --port 8201 --max-num-seqs 32 --max-model-len 2048 --dtype float32
    .venv/bin/python bench/loadtest_calibrate_validate.py --base-url http://127.0.0.1:8201
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from loadtest.calibrate import CalibrationPoint, fit_profile
from loadtest.config import LoadTestConfig
from loadtest.metrics import RunMetrics, compute_run_metrics
from loadtest.results import load_run_records, write_run
from loadtest.runner import run_load
from loadtest.scrape import Sample
from loadtest.simulate import simulate_run
from loadtest.sweep import SweepResult, run_sweep, served_rate

SMOLLM = Path("~/.cache/oss-serving/models/smollm2-135m-instruct").expanduser()
#: Two prompt lengths mixed at every rate, so that the KV tokens a sequence holds vary
#: independently of how many sequences run (a single length distribution leaves the
#: per-sequence and per-KV-token step costs confounded).
WORKLOAD_A = {
    "name": "A",
    "classes": [
        {"name": "short", "input_tokens": 64, "output_tokens": 32},
        {"name": "long", "input_tokens": 768, "output_tokens": 32},
    ],
}
#: The first validation used one class, prompts uniform in 64-512 tokens.
WORKLOAD_A_UNIFORM = {
    "name": "A-uniform",
    "classes": [{"input_tokens": {"dist": "uniform", "min": 64, "max": 512}, "output_tokens": 32}],
}
WORKLOAD_B = {"name": "B", "classes": [{"input_tokens": 512, "output_tokens": 96}]}


def _cfg(
    url: str, model: str, workload: dict[str, Any], rates: list[float], duration: float
) -> LoadTestConfig:
    return LoadTestConfig.model_validate(
        {
            "target": {"base_url": url, "model": model, "request_timeout_s": 300},
            "workload": workload,
            "metrics": {"tokenizer": f"hf:{SMOLLM}", "percentiles": [50, 90, 99]},
            "scrape": {"urls": [f"{url}/metrics"], "interval_s": 2.0},
            "sweep": {"rates": rates, "duration_s": duration, "min_requests": 12, "stop_after_saturated": 2},
            "load": {"drain_timeout_s": 120},
            "output": {"progress": False},
            "calibrate": {"max_num_seqs": 32, "max_num_batched_tokens": 2048},
        }
    )


Point = tuple[float, RunMetrics, bool, bool]
"""(rate, metrics, saturated, valid)"""


def _points(res: SweepResult) -> list[Point]:
    return [(p.rate, p.metrics, p.saturated, bool(p.result["valid"])) for p in res.points]


def _saved(folder: Path) -> list[tuple[float, RunMetrics, bool, bool, list[Any], list[Sample]]]:
    """Points saved by an earlier live run: (rate, metrics, saturated, valid, records, samples)."""
    out = []
    for sub in sorted(folder.iterdir(), key=lambda p: float(p.name.removeprefix("rate_"))):
        result = json.loads((sub / "result.json").read_text())
        records = load_run_records(sub)
        with (sub / "server_metrics.jsonl").open() as fh:
            samples = [Sample(**json.loads(line)) for line in fh if line.strip()]
        metrics = compute_run_metrics(records, [50, 90, 99])
        served = served_rate(records)
        offered = result["validity"]["scheduled_rate"] or result["target_rate"]
        saturated = served is not None and served < 0.9 * offered
        out.append(
            (float(result["target_rate"]), metrics, saturated, bool(result["valid"]), records, samples)
        )
    return out


def _summary(points: list[Point]) -> dict[str, Any]:
    return {
        "saturation_rps": max(m.request_throughput for _, m, _, _ in points),
        "saturation_output_tps": max(m.output_token_throughput for _, m, _, _ in points),
        "ttft_p50_lowest_rate_s": points[0][1].distributions["ttft"].percentiles["p50"],
        "points": [
            {
                "rate": rate,
                "rps": m.request_throughput,
                "ttft_p50": m.distributions["ttft"].percentiles["p50"],
                "tpot_p50": m.distributions["tpot"].percentiles["p50"],
                "saturated": saturated,
                "valid": valid,
            }
            for rate, m, saturated, valid in points
        ],
    }


@click.command()
@click.option("--base-url", required=True)
@click.option("--model", default="smollm2", show_default=True)
@click.option("--rates", default="0.1,0.25,0.5,1,1.5,2.5", show_default=True)
@click.option("--duration", default=40.0, show_default=True, help="Seconds of schedule per point.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/calibrate-validate")
)
@click.option(
    "--from-saved",
    is_flag=True,
    help="Refit from sweep A saved in --out; sweep B too if saved, else run it live.",
)
@click.option("--workload-a", type=click.Choice(["mixed", "uniform"]), default="mixed", show_default=True)
def main(
    base_url: str, model: str, rates: str, duration: float, out: Path, from_saved: bool, workload_a: str
) -> None:
    rate_list = [float(x) for x in rates.split(",")]
    work_a = WORKLOAD_A if workload_a == "mixed" else WORKLOAD_A_UNIFORM
    out.mkdir(parents=True, exist_ok=True)

    def live_sweep(name: str, workload: dict[str, Any]) -> SweepResult:
        cfg = _cfg(base_url, model, workload, rate_list, duration)

        def on_point(p: Any) -> None:
            write_run(out / name / f"rate_{p.rate:g}", p.result, p.raw)
            m = p.metrics
            print(
                f"[{name}] rate {p.rate:g}: {m.request_throughput:.3f} req/s, TTFT p50 "
                f"{(m.distributions['ttft'].percentiles['p50'] or 0) * 1e3:.0f} ms, TPOT p50 "
                f"{(m.distributions['tpot'].percentiles['p50'] or 0) * 1e3:.1f} ms"
                f"{' SATURATED' if p.saturated else ''}{'' if p.result['valid'] else ' INVALID'}",
                flush=True,
            )

        return run_sweep(cfg, run_load, on_point)

    if from_saved:
        saved_a = _saved(out / "A")
        measured_a = [p[:4] for p in saved_a]
        calib = [CalibrationPoint(p[0], p[4], p[5]) for p in saved_a]
        rate_list = [p[0] for p in saved_a]
    else:
        res_a = live_sweep("A", work_a)
        measured_a = _points(res_a)
        calib = [CalibrationPoint(p.rate, p.raw.records, p.raw.samples) for p in res_a.points]
    cfg_a = _cfg(base_url, model, work_a, rate_list, duration)
    report = fit_profile(calib, cfg_a.calibrate, "smollm2-cpu")
    (out / "profile.yaml").write_text(yaml.safe_dump(report.profile.model_dump(mode="json"), sort_keys=False))
    print(yaml.safe_dump(report.to_dict(), sort_keys=False))
    cfg_b = _cfg(base_url, model, WORKLOAD_B, rate_list, duration)
    predicted = _points(run_sweep(cfg_b, lambda c: simulate_run(c, report.profile)))
    predicted_a = _points(run_sweep(cfg_a, lambda c: simulate_run(c, report.profile)))
    have_b = from_saved and (out / "B").is_dir()
    measured = [p[:4] for p in _saved(out / "B")] if have_b else _points(live_sweep("B", WORKLOAD_B))
    doc = {
        "profile": report.to_dict(),
        "A_measured": _summary(measured_a),
        "A_simulated": _summary(predicted_a),
        "B_predicted": _summary(predicted),
        "B_measured": _summary(measured),
    }
    (out / "validation.json").write_text(json.dumps(doc, indent=1))
    print(f"{'workload B':<28}{'predicted':>12}{'measured':>12}{'error':>9}")
    for key in ("saturation_rps", "saturation_output_tps", "ttft_p50_lowest_rate_s"):
        p, m = doc["B_predicted"][key], doc["B_measured"][key]
        err = (p - m) / m if m else float("nan")
        print(f"{key:<28}{p:>12.4f}{m:>12.4f}{err:>+9.1%}")
    pa, ma = doc["A_simulated"], doc["A_measured"]
    print(f"(workload A, fitted: saturation {pa['saturation_rps']:.3f} simulated")
    print(f" vs {ma['saturation_rps']:.3f} req/s measured)")


if __name__ == "__main__":
    main()
