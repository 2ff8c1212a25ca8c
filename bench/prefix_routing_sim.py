"""The two-replica prefix-routing comparison of ``bench/prefix_routing.py``, predicted by the
load tester's fleet simulator and checked against that benchmark's measured run.

The simulator (``loadtest/fleet.py``, ``oss-loadtest routing``) runs the workload of
``prefix_routing.py`` (8 system prompts of 1,500 tokens, questions of 20-60 words, Poisson
arrivals, ``--max-tokens`` output tokens) on simulated replicas of ``--profile`` (a profile
``oss-loadtest calibrate`` fitted on the same engine arguments: SmolLM2 on vLLM CPU, one
OpenMP thread) with the benchmark's KV cache (``--kv-blocks`` blocks of 128 tokens per
replica, twice that for the single-replica reference) under round robin, Ray Serve's
default and our prefix routing. The prediction is averaged over ``--seeds`` arrival
sequences (the measured run is one of them). Printed: predicted and measured hit rate
and TTFT p50 per router, and the two figures the issue checks, hit rate ours / single
replica and TTFT p50 ours / round robin, with the prediction error of each.

    python bench/prefix_routing.py --requests 120 --rate 0.8 --kv-blocks 64 --out results/prefix_routing.json
    python bench/prefix_routing_sim.py --profile smollm2-1t.yaml --measured results/prefix_routing.json \\
        --requests 120 --rate 0.8 --kv-blocks 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.config import LoadTestConfig
from loadtest.sim import load_profile
from loadtest.simulate import compare_routing

#: The benchmark's router names, and the simulator's.
NAMES = {
    "single replica": "single replica (KV of all)",
    "round robin": "round_robin",
    "Ray default (pow-2)": "power_of_two",
    "oss-serving prefix": "prefix",
}
SMOLLM = Path("~/.cache/oss-serving/models/smollm2-135m-instruct").expanduser()


def config(requests: int, rate: float, max_tokens: int, seed: int) -> LoadTestConfig:
    """The workload of ``prefix_routing.py`` in the load tester's terms."""
    return LoadTestConfig.model_validate(
        {
            "workload": {
                "name": "prefix-routing-bench",
                "classes": [
                    {
                        "shared_prefix": {"groups": 8, "tokens": 1500},
                        # "User N asks: " and 20-60 words (SmolLM2: about 1.3 tokens a word)
                        "input_tokens": {"dist": "uniform", "min": 32, "max": 84},
                        "output_tokens": max_tokens,
                    }
                ],
            },
            "load": {"rate": rate, "num_requests": requests, "seed": seed, "max_duration_s": 36_000},
            "metrics": {"tokenizer": f"hf:{SMOLLM}" if SMOLLM.exists() else "words"},
            "output": {"progress": False},
        }
    )


def predict(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    base = load_profile(args.profile)
    profile = base.model_copy(update={"block_size": 128, "num_kv_blocks": args.kv_blocks})
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in range(args.seeds):
        cfg = config(args.requests, args.rate, args.max_tokens, seed + 1)
        cfg.fleet.index_capacity_blocks = max(1, args.kv_blocks * 128 * 4 // 256)
        for row in compare_routing(cfg, profile, 2):
            runs.setdefault(row["policy"], []).append(row)
    return {
        name: {
            "hit_rate": statistics.mean(r["hit_rate"] for r in rows),
            "ttft_p50_s": statistics.mean(r["ttft_p50_s"] for r in rows),
        }
        for name, rows in runs.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", required=True, help="calibrated profile of one engine replica")
    parser.add_argument("--measured", type=Path, help="prefix_routing.py's JSON (omit: prediction only)")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/prefix_routing_sim.json"))
    args = parser.parse_args()
    console = Console()
    pred = predict(args)
    meas: dict[str, dict[str, float]] = {}
    if args.measured:
        doc = json.loads(args.measured.read_text())
        meas = {NAMES[r["name"]]: r for r in doc["runs"] if r["name"] in NAMES}

    def err(p: float, m: float | None) -> str:
        return "-" if not m else f"{p / m - 1:+.1%}"

    table = Table(
        title=f"{args.requests} requests at {args.rate:g}/s, 2 replicas x {args.kv_blocks} KV blocks"
    )
    for col in ("router", "hit rate pred.", "meas.", "error", "TTFT p50 s pred.", "meas.", "error"):
        table.add_column(col, justify="right")
    for name, p in pred.items():
        m = meas.get(name, {})
        table.add_row(
            name,
            f"{p['hit_rate']:.3f}",
            f"{m['hit_rate']:.3f}" if m else "-",
            err(p["hit_rate"], m.get("hit_rate")),
            f"{p['ttft_p50_s']:.3f}",
            f"{m['ttft_p50_s']:.3f}" if m else "-",
            err(p["ttft_p50_s"], m.get("ttft_p50_s")),
        )
    console.print(table)
    summary: dict[str, Any] = {}
    for key, num, den, metric in (
        ("hit_rate_vs_single", "prefix", "single replica (KV of all)", "hit_rate"),
        ("ttft_p50_vs_round_robin", "prefix", "round_robin", "ttft_p50_s"),
    ):
        ratio = pred[num][metric] / pred[den][metric]
        line = {"predicted": ratio}
        if num in meas and den in meas:
            measured = meas[num][metric] / meas[den][metric]
            line |= {"measured": measured, "error": ratio / measured - 1}
        summary[key] = line
        console.print(
            f"{key}: predicted {ratio:.3f}"
            + (f", measured {line['measured']:.3f}, error {line['error']:+.1%}" if "measured" in line else "")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"predicted": pred, "measured": meas, "summary": summary}, indent=2))
    console.print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
