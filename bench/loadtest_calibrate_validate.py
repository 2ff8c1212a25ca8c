"""Calibrate a simulated-engine profile on one workload, predict another, compare.

1. Sweep workload A (chat, input 32-256 tokens uniform, 24 output tokens) against a real
   endpoint, scraping its ``/metrics``; fit a profile (``loadtest.calibrate``).
2. Predict workload B (input 256, output 64 tokens) at the same rates with the
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
from loadtest.results import write_run
from loadtest.runner import run_load
from loadtest.simulate import simulate_run
from loadtest.sweep import SweepResult, run_sweep

SMOLLM = Path("~/.cache/oss-serving/models/smollm2-135m-instruct").expanduser()
WORKLOAD_A = {
    "name": "A",
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


def _summary(res: SweepResult) -> dict[str, Any]:
    low = res.points[0].metrics.distributions["ttft"].percentiles["p50"]
    return {
        "saturation_rps": res.saturation_throughput,
        "saturation_output_tps": res.saturation_output_tps,
        "ttft_p50_lowest_rate_s": low,
        "points": [
            {
                "rate": p.rate,
                "rps": p.metrics.request_throughput,
                "ttft_p50": p.metrics.distributions["ttft"].percentiles["p50"],
                "tpot_p50": p.metrics.distributions["tpot"].percentiles["p50"],
                "saturated": p.saturated,
                "valid": p.result["valid"],
            }
            for p in res.points
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
def main(base_url: str, model: str, rates: str, duration: float, out: Path) -> None:
    rate_list = [float(x) for x in rates.split(",")]
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

    a = live_sweep("A", WORKLOAD_A)
    cfg_a = _cfg(base_url, model, WORKLOAD_A, rate_list, duration)
    report = fit_profile(
        [CalibrationPoint(p.rate, p.raw.records, p.raw.samples) for p in a.points],
        cfg_a.calibrate,
        "smollm2-cpu",
    )
    (out / "profile.yaml").write_text(yaml.safe_dump(report.profile.model_dump(mode="json"), sort_keys=False))
    print(yaml.safe_dump(report.to_dict(), sort_keys=False))
    cfg_b = _cfg(base_url, model, WORKLOAD_B, rate_list, duration)
    predicted = run_sweep(cfg_b, lambda c: simulate_run(c, report.profile))
    predicted_a = run_sweep(cfg_a, lambda c: simulate_run(c, report.profile))
    measured = live_sweep("B", WORKLOAD_B)
    doc = {
        "profile": report.to_dict(),
        "A_measured": _summary(a),
        "A_simulated": _summary(predicted_a),
        "B_predicted": _summary(predicted),
        "B_measured": _summary(measured),
    }
    (out / "validation.json").write_text(json.dumps(doc, indent=1))
    p, m = doc["B_predicted"], doc["B_measured"]
    print(f"{'workload B':<28}{'predicted':>12}{'measured':>12}{'error':>9}")
    for key in ("saturation_rps", "saturation_output_tps", "ttft_p50_lowest_rate_s"):
        err = (p[key] - m[key]) / m[key] if m[key] else float("nan")
        print(f"{key:<28}{p[key]:>12.4f}{m[key]:>12.4f}{err:>+9.1%}")
    pa, ma = doc["A_simulated"], doc["A_measured"]
    print(f"(workload A, fitted: saturation {pa['saturation_rps']:.3f} simulated")
    print(f" vs {ma['saturation_rps']:.3f} req/s measured)")


if __name__ == "__main__":
    main()
